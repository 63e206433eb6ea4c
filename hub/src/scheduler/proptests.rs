//! Property tests over random snapshots.
