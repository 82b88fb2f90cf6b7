//! bfloat16 autocast on CUDA, shared by training, sampling and the bench.

use tch::Device;

/// Runs `f` with CUDA autocast in bfloat16 when `enabled` (a no-op on the CPU).
pub fn autocast_bf16<T>(enabled: bool, device: Device, f: impl FnOnce() -> T) -> T {
    if !(enabled && device.is_cuda()) {
        return f();
    }
    // tch only toggles autocast, whose CUDA dtype defaults to float16; libtorch's
    // `at::autocast::set_autocast_dtype(DeviceType, ScalarType)` picks bfloat16. Both enums
    // are `int8_t`-backed, which the C calling convention passes like `i8`.
    extern "C" {
        #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
        fn set_autocast_dtype(device_type: i8, dtype: i8);
    }
    const CUDA: i8 = 1;
    const BFLOAT16: i8 = 15;
    // SAFETY: the symbol is exported by libtorch_cpu (torch 2.11) with this signature.
    unsafe { set_autocast_dtype(CUDA, BFLOAT16) };
    tch::autocast(true, f)
}
