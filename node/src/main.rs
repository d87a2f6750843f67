fn main() {
    std::process::exit(starling_node::cli::main());
}
