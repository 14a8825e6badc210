"""The coordinator service: client `up` frames and online/offline events, batched to each
product's business webhook."""
