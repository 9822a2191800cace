"""Pure-Python codec backend (numpy + zstandard + xxhash).

``tinyserve._fallback.core`` is the test oracle for the native codec and the fallback used when the
extension is absent; see docs/native-api.md.
"""
