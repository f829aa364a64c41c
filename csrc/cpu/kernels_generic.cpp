// The CPU kernel table for any CPU (kernel_table.h): at::vec's portable fallback and the
// compiler's baseline target.
#define CPU_CAPABILITY mhgd_generic  // at::vec's inline namespace: apart from libtorch's own
#define MHGD_CPU_CAPABILITY generic
#include "capability_kernels.h"
