"""The gateway: holds client connections and delivers frames to them."""
