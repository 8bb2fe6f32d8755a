//! `tandem-loadtest`: simulated devices against a running Tandem server.
//!
//! **Not built yet**: it needs the wire protocol and the server (later issues). Running it
//! says so and exits with status 2 rather than pretending to measure anything.

fn main() {
    eprintln!("tandem-loadtest is not built yet: it arrives once the edge-cloud server exists");
    std::process::exit(2);
}
