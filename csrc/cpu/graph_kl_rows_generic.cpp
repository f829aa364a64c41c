// The graph-KL row math for any x86-64/ARM CPU: at::vec's portable fallback.
#define CPU_CAPABILITY mhgd_generic
#define MHGD_CPU_CAPABILITY generic
#include "graph_kl_rows_impl.h"
