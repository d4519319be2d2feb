"""Where the cache and the rate limiter keep their state: Redis (shared by every replica) or this process."""
