//! What the CPU can do, as values: a kernel that needs an instruction set takes the token that
//! proves the CPU has it, so calling it from safe code is sound.

/// Proof that this CPU runs AVX-512F instructions: only [`Avx512::detect`] makes one, after
/// asking the CPU. The packed convolution kernels take it, so they cannot run where AVX-512 is
/// missing. It cannot be made otherwise:
///
/// ```compile_fail
/// let forged = gradcam_kernels::Avx512 { _proof: () };
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Avx512 {
    _proof: (),
}

impl Avx512 {
    /// `Some` when the CPU has AVX-512F, unless the environment sets `GRADCAM_NO_AVX512` (to
    /// test or compare the portable path, which every op also has).
    pub fn detect() -> Option<Avx512> {
        #[cfg(target_arch = "x86_64")]
        {
            (std::arch::is_x86_feature_detected!("avx512f") && std::env::var_os("GRADCAM_NO_AVX512").is_none()).then_some(Avx512 { _proof: () })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }
}

/// Whether this CPU has AVX2 and FMA (the matrix-vector kernels of recurrent heads and
/// fully-connected rows use them when it does).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// glibc hands allocations above 128 KiB back to the kernel when they are freed, and trims the
/// heap eagerly; explaining allocates and frees buffers of that size for every image and word, and
/// the page faults of getting them back cost as much as the arithmetic. This keeps freed memory
/// (up to 256 MiB) for reuse. Call it first thing in `main`, before other threads exist; elsewhere
/// than Linux with glibc it does nothing.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings, with valid parameter constants.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        // One arena for every thread: a batch's layers run on the pool's threads, and a thread's
        // own arena hands a heap back to the kernel as soon as it is all free, so every batch
        // faulted its buffers in again (1.2 million page faults over 400 images at batch 16, 30% of
        // the time); with one arena the trim threshold above keeps them.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
