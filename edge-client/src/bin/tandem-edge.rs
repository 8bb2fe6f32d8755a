//! `tandem-edge`: the device side of Tandem on the command line (see `tandem_edge::cli`).

fn main() -> std::process::ExitCode {
    tandem_edge::cli::main()
}
