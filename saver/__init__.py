"""The saver service: at-least-once messages stored until ACKed, memory or Redis backed."""
