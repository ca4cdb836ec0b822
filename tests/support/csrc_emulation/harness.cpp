// Builds one csrc/*.cu, whose kernel launches the test rewrote into emu::launch calls, for the
// host emulation in host_shim.h. FCL_KERNEL_SOURCE names the rewritten file.
#include "host_shim.h"
#include FCL_KERNEL_SOURCE
