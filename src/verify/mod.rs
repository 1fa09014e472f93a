//! Drift verification's algorithms, apart from any protocol: resource ids read from NDJSON lines
//! ([`ids`]), sorted in bounded memory by spilling sorted runs to a staging area and merging them
//! ([`sort`]), and two sorted id streams compared into per-type counts, examples and a file of the
//! extras ([`compare`]). Ten million ids per side fit in the same few MiB as ten.

pub mod compare;
pub mod ids;
pub mod lines;
pub mod sort;
