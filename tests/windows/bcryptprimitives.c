/*
 * Test-only stand-in for Windows' bcryptprimitives.dll, for running the Windows binaries under
 * Wine 8 (Debian 12), which lacks it. Rust's standard library takes its random numbers (the
 * keys of HashMap's hasher) from ProcessPrng in that DLL; without it the binaries cannot start
 * there. This one exports ProcessPrng on top of SystemFunction036 (RtlGenRandom, advapi32),
 * which Wine has. Windows itself has the real DLL.
 *
 * The Wine tests (tests/suite/windows.rs) build it with mingw and put it beside the .exe files
 * they build in a directory of their own (target/wine/...): it is never part of a release.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x40000000 ? 0x40000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
