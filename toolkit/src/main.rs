fn main() {
    std::process::exit(audit::cli::main());
}
