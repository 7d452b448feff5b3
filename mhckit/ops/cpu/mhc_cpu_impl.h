/* Body of the mhckit CPU kernels for one floating type; included by mhc_cpu.c once per type with
 * T (the type), FN(name) (adds the type suffix), TINY (smallest normal) and EXP defined.
 * See mhc_cpu.c for the maths and the layouts. */

/* The parts, in order (each uses those before it): */
#include "mhc_cpu_sinkhorn.h"
#include "mhc_cpu_tail.h"
#include "mhc_cpu_stream.h"
#include "mhc_cpu_coeffs.h"
#include "mhc_cpu_hc.h"

#undef KB
#undef XW
#undef XV
#undef XI
#undef XLD
#undef XST
#undef XSHUF
#undef SHUF
#undef VLD
#undef VST
#undef VT
#undef IV
#undef VSEL
#undef VMAX
#undef VEXP
#undef SL
#undef SKG
#undef SVT
/* this instantiation's parameters (set by mhc_cpu.c before each include) */
#undef ITYPE
#undef ZMM
#undef VEXP_POLY
#undef T
#undef SUFFIX
#undef TINY
#undef EXP
#undef TANH
#undef HC_COLS
