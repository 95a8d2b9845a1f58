//! SDXL: two text encoders, the pooled vector and time ids, two learned tables, against
//! the reference fixtures of tests/reference/make_tiny_sdxl.py.
