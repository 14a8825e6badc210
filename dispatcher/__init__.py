"""The dispatcher: answers a client's "where do I connect?" with an ordered list of room
instance addresses, sticky per user, from the register's node table."""
