"""cffi out-of-line build of the native copier into ``host_agent.storage._copier``.

Named in ``setup.py``'s ``cffi_modules``; ``pip install .`` compiles it and
links Debian's libcrypto (libssl-dev) and libzstd (libzstd-dev).
"""
from cffi import FFI

CDEF = """
#define HB_ID_LEN 32
#define HB_OK 0
#define HB_ESYS 1
#define HB_ECORRUPT 2
#define HB_EMISSING 3
#define HB_EFORMAT 4
#define HB_ESHORT 5
#define HB_EARG 6
#define HB_ENOMEM 7
#define HB_AT_SOURCE 1
#define HB_AT_REPO_WRITE 2
#define HB_AT_REPO_READ 3
#define HB_AT_TARGET 4
#define HB_BLOB_DATA 0
#define HB_BLOB_TREE 1
#define HB_TODO_READ 0
#define HB_TODO_ZERO 1
#define HB_TODO_KEEP 2
#define HB_CHUNK_NEW 0
#define HB_CHUNK_DUP 1
#define HB_CHUNK_ZERO 2
#define HB_CHUNK_KEPT 3

typedef struct hb_error { int code; int err_no; int where; uint8_t id[32]; } hb_error;
typedef struct hb_progress {
    uint64_t bytes_done; uint64_t bytes_read; uint64_t bytes_new; uint64_t bytes_stored;
    uint64_t bytes_changed; uint64_t chunks_new; uint64_t chunks_dup; uint64_t chunks_zero;
    uint64_t cancel;
} hb_progress;
typedef struct hb_repo hb_repo;

int hb_repo_open(const char *root, const uint8_t writer_id[16], uint32_t chunk_size,
                 uint64_t pack_target, int zstd_level, hb_repo **out, hb_error *err);
void hb_repo_close(hb_repo *r);
int hb_index_reserve(hb_repo *r, uint64_t more, hb_error *err);
int hb_index_load(hb_repo *r, const char *pack_name, hb_error *err);
uint64_t hb_index_count(hb_repo *r);
int hb_index_contains(hb_repo *r, const uint8_t id[32]);
int hb_backup_segment(hb_repo *r, int fd, uint64_t first_chunk, uint64_t src_size,
                      uint32_t nchunks, const uint8_t *todo, const uint8_t *base_ids,
                      const int32_t *chunk_fds, const uint64_t *chunk_offsets,
                      uint8_t *out_ids, uint8_t *out_state, int threads,
                      hb_progress *progress, hb_error *err);
int hb_store_blob(hb_repo *r, const uint8_t *data, uint32_t len, int type,
                  uint8_t id_out[32], int *was_new, hb_error *err);
int hb_read_blob(hb_repo *r, const uint8_t id[32], uint8_t *out, uint32_t cap,
                 uint32_t *len_out, hb_error *err);
int hb_flush(hb_repo *r, hb_error *err);
int hb_restore_segment(hb_repo *r, int fd, uint64_t first_chunk, uint64_t size,
                       uint32_t nchunks, const uint8_t *ids, int write_zeros,
                       int threads, hb_progress *progress, hb_error *err);
int hb_verify_index(hb_repo *r, uint32_t per_10000, int threads, uint8_t *bad_ids,
                    uint32_t bad_cap, uint32_t *nbad, hb_progress *progress, hb_error *err);
int hb_hash(const uint8_t *data, uint64_t len, uint8_t out[32]);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "host_agent.storage._copier",
    '#include "copier.h"',
    # relative to the project root, where setuptools runs this script
    sources=["native/copier.c"],
    include_dirs=["native"],
    libraries=["crypto", "zstd", "pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
