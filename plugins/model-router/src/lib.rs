//! `model-router`: work in progress.

#![forbid(unsafe_code)]
