//! `task-policy`: work in progress.

#![forbid(unsafe_code)]
