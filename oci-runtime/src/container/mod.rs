//! The container executor: OCI runtime bundles run under Linux namespaces and cgroups.
//! (Being built.)
