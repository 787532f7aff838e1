//! The `tomo` command; everything lives in `tomo::cli`.

fn main() -> std::process::ExitCode {
    tomo::cli::main()
}
