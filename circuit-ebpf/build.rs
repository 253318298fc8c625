use which::which;

fn main() {
    // bpf-linker is not a cargo dependency but produces the object: rebuild when it changes.
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
