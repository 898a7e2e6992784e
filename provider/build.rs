//! Generates the provider's `repr(C)` types and constants from libfabric-dev's own headers
//! (`/usr/include/rdma`), with bindgen (which loads libclang: `libclang-dev`, see
//! tools/setup.sh). bindgen also emits a layout assertion for every struct, so a struct whose
//! size or field offsets differ from what the C compiler sees fails the build.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    // fi_dupinfo/fi_freeinfo: the fi_info lists are allocated the way libfabric frees them.
    println!("cargo:rustc-link-lib=dylib=fabric");
    let header = PathBuf::from("/usr/include/rdma/fabric.h");
    if !header.exists() {
        panic!(
            "{} is missing: the provider is built against libfabric-dev's headers \
             (run tools/setup.sh, or apt-get install libfabric-dev libclang-dev)",
            header.display()
        );
    }
    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_type("fi_.*|fid.*")
        .allowlist_var("FI_.*")
        .allowlist_function("fi_(dupinfo|freeinfo|strerror)")
        // The inline wrappers (fi_close, fi_tsend, ...) are the application's side of the ops
        // tables: the provider fills the tables instead.
        .generate_inline_functions(false)
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen could not translate libfabric's headers");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("fabric.rs"))
        .expect("writing the generated bindings");
}
