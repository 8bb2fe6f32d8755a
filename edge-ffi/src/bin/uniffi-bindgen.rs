//! UniFFI's binding generator, built against this crate's UniFFI version (the generator and
//! the library must match). See the crate manifest for the command.

fn main() {
    uniffi::uniffi_bindgen_main()
}
