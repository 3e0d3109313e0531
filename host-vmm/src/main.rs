//! `pvsync`: see `pvsync --help`.

fn main() {
    let code = host_vmm::cli::main_with_args(
        std::env::args_os(),
        Box::new(std::io::stdout()),
        &mut std::io::stderr(),
    );
    std::process::exit(code);
}
