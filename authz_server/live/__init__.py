"""The live state: the tables Check reads, the follower that keeps them current, the verified-key cache.

- `tables`: `AuthState` and its entries, pure data, no I/O. Check and the admin
  authenticator read it; only the follower writes it.
- `follower`: `StateFollower`, the store I/O and decryption that fill the tables from a
  snapshot and then from the change log.
- `verified`: `VerifiedKeys`, which presented key passed Argon2 for each key id.

Not to be confused with `store/memory.py`, a whole Store kept in process memory for tests:
these tables are what every sidecar holds whatever its store.
"""
