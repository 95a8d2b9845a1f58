fn main() {
    println!("cargo:rerun-if-changed=assets/bpe_simple_vocab_16e6.txt.gz");
}
