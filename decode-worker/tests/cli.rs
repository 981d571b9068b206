//! The `sluice-decode` binary itself.

#[test]
fn refuses_to_start_without_etcd_and_says_how() {
    sluice_harness::assert_refuses_to_start_without_etcd(std::path::Path::new(env!(
        "CARGO_BIN_EXE_sluice-decode"
    )));
}
