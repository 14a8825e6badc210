"""Storage engines behind `im.sessions.SessionStore`; all pass one contract test suite.

Import the engine module you need (`register.engines.memory`, `register.engines.redis`), so
the embedded deployment never loads the Redis client.
"""
