//! `pvsync`: see `pvsync --help`.

fn main() {
    // Without the handler Ctrl-C still ends the run, only without its results.
    if let Err(e) = host_vmm::signals::install() {
        eprintln!("pvsync: warning: {e}");
    }
    let code = host_vmm::cli::main_with_args(
        std::env::args_os(),
        Box::new(std::io::stdout()),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
