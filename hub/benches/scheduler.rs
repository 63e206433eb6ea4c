//! Scheduler throughput benchmark (filled in with the scheduler's workload kinds).
fn main() {}
