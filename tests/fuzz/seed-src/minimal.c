/* The seed seeds/elf_precheck/minimal.so: the smallest file the ELF pre-check accepts, a shared
 * object holding only the header symbol (72 bytes, 8-aligned) with the magic bytes and version 1.
 * The other seeds there are variants of it: the symbol as a function (function.so), as an
 * absolute symbol (absolute.so), version 2 (version2.so), another name (no-header.so), and the
 * first 700 bytes of minimal.so (truncated.so). Rebuild with:
 *
 *   gcc -shared -nostdlib -Os -s -fPIC -Wl,-z,max-page-size=0x1000 -Wl,-z,noseparate-code \
 *       -Wl,-z,norelro -Wl,--hash-style=gnu -Wl,--build-id=none -o minimal.so minimal.c
 */
__attribute__((aligned(8), used, visibility("default")))
const unsigned char PLUGIN_HOST_HEADER[72] = {'P', 'l', 'g', 'H', 'o', 's', 't', 1, 1, 0, 0, 0};
