fn main() {
    std::process::exit(kvstrap::cli::main());
}
