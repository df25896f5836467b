// The kernel cores in portable C++ (no intrinsics): what every CPU runs, ARM included; the
// compiler vectorizes them for the baseline of the build.
#include "cores_prelude.h"

#define SPARSEKIT_ISA scalar
#include "cores_impl.h"
