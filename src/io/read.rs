//! Bounded reads of user-supplied paths (issue 10, item 2): filled in next.
