/*
 * hyperback native copier: the data path's hot loops.
 *
 * The C side reads sources, detects zero chunks, hashes (SHA-256), deduplicates
 * against an in-memory chunk index, compresses (zstd) and appends to pack files;
 * and on restore reads, decompresses, verifies and writes. In an encrypted
 * repository ids are HMAC-SHA256 and payloads are sealed with AES-256-GCM. Everything else
 * (snapshots, trees, locks, retention, messages) lives in Python.
 *
 * Contract: every function returns HB_OK (0) or a nonzero status; on failure
 * the hb_error passed in says what failed, where, with which errno, and for
 * data errors which chunk. The on-disk formats written here are specified in
 * docs/repository-format.md; this file follows that document.
 */
#ifndef HYPERBACK_COPIER_H
#define HYPERBACK_COPIER_H

#include <stdint.h>

#define HB_ID_LEN 32
#define HB_PACK_ID_LEN 16      /* a pack's NAME is its id in lowercase hex */
#define HB_INDEX_HEADER_LEN 32 /* magic 4, version 4, pack id 16, count 4, reserved 4 */
#define HB_INDEX_ENTRY_LEN 52  /* id 32, type 1, comp 1, reserved 2, offset 8, stored len 4, raw len 4 */
#define HB_KEY_LEN 32          /* an encrypted repository's AEAD key and id key, each */
#define HB_NONCE_LEN 12        /* AES-256-GCM nonce, random, before the ciphertext */
#define HB_TAG_LEN 16          /* AES-256-GCM tag, after the ciphertext */

/* status codes */
#define HB_OK 0
#define HB_ESYS 1       /* a system call failed: see err_no and where */
#define HB_ECORRUPT 2   /* a blob failed its header, decompression or hash check */
#define HB_EMISSING 3   /* a chunk id is not in the index */
#define HB_EFORMAT 4    /* a pack or index file is malformed */
#define HB_ESHORT 5     /* the source ended before its announced size */
#define HB_EARG 6       /* invalid argument (a bug in the caller) */
#define HB_ENOMEM 7

/* where a system error happened */
#define HB_AT_SOURCE 1
#define HB_AT_REPO_WRITE 2
#define HB_AT_REPO_READ 3
#define HB_AT_TARGET 4

/* blob types */
#define HB_BLOB_DATA 0
#define HB_BLOB_TREE 1

/* per-chunk instructions for hb_backup_segment */
#define HB_TODO_READ 0  /* read, hash, store if new */
#define HB_TODO_ZERO 1  /* lies in a hole: record as zero without reading */
#define HB_TODO_KEEP 2  /* unchanged: copy the base id without reading */

/* per-chunk outcome of hb_backup_segment */
#define HB_CHUNK_NEW 0       /* stored now */
#define HB_CHUNK_DUP 1       /* already in the repository */
#define HB_CHUNK_ZERO 2      /* all zero, not stored */
#define HB_CHUNK_KEPT 3      /* taken from the base without reading */

typedef struct hb_error {
    int code;
    int err_no;
    int where;
    uint8_t id[HB_ID_LEN];
} hb_error;

/* Counters updated atomically by worker threads; Python polls them for progress. */
typedef struct hb_progress {
    uint64_t bytes_done;     /* logical bytes of the source (or target) dealt with */
    uint64_t bytes_read;     /* bytes actually read from the source or from packs */
    uint64_t bytes_new;      /* raw bytes of chunks stored now */
    uint64_t bytes_stored;   /* bytes appended to packs (headers + compressed) */
    uint64_t bytes_changed;  /* raw bytes whose id differs from the base id */
    uint64_t chunks_new;
    uint64_t chunks_dup;
    uint64_t chunks_zero;
    uint64_t cancel;         /* set nonzero to ask workers to stop */
} hb_progress;

typedef struct hb_repo hb_repo;

/* Open the native half of a repository rooted at `root` (it must exist). */
int hb_repo_open(const char *root, const uint8_t writer_id[16], uint32_t chunk_size,
                 uint64_t pack_target, int zstd_level, hb_repo **out, hb_error *err);
void hb_repo_close(hb_repo *r);

/*
 * Make the repository encrypted (docs/repository-format.md, section 11): chunk ids become
 * HMAC-SHA256(id_key, raw bytes) and every payload is sealed with AES-256-GCM under aead_key.
 * Only before the first blob is read or written; the keys are copied (and wiped at close).
 */
int hb_repo_set_keys(hb_repo *r, const uint8_t aead_key[HB_KEY_LEN], const uint8_t id_key[HB_KEY_LEN],
                     hb_error *err);

/* Make room for `more` index entries so that no resize happens while workers run. */
int hb_index_reserve(hb_repo *r, uint64_t more, hb_error *err);
/* Load index/<pack_name> (32 hex chars) and register the pack. */
int hb_index_load(hb_repo *r, const char *pack_name, hb_error *err);
uint64_t hb_index_count(hb_repo *r);
/* 1 if the id is in the index, else 0. */
int hb_index_contains(hb_repo *r, const uint8_t id[HB_ID_LEN]);

/*
 * Back up `nchunks` chunks of the source open on `fd`, starting at chunk index
 * `first_chunk` (byte offset first_chunk * chunk_size). `src_size` is the source
 * size (the last chunk may be short). `todo[i]` says what to do with chunk i;
 * `base_ids` (nullable) holds the base snapshot's ids for the same chunks.
 * `chunk_fds` and `chunk_offsets` (both nullable) say where chunk i lies when
 * the image is not a plain file, e.g. in the clusters of a qcow2 chain: chunk i
 * is then read from chunk_fds[i] at chunk_offsets[i] (`fd` is unused).
 * Fills out_ids (nchunks * 32 bytes) and out_state (nchunks bytes).
 */
int hb_backup_segment(hb_repo *r, int fd, uint64_t first_chunk, uint64_t src_size,
                      uint32_t nchunks, const uint8_t *todo, const uint8_t *base_ids,
                      const int32_t *chunk_fds, const uint64_t *chunk_offsets,
                      uint8_t *out_ids, uint8_t *out_state, int threads,
                      hb_progress *progress, hb_error *err);

/* Store one blob (a tree page); sets *was_new. */
int hb_store_blob(hb_repo *r, const uint8_t *data, uint32_t len, int type,
                  uint8_t id_out[HB_ID_LEN], int *was_new, hb_error *err);

/* Read and verify one blob into out (capacity cap); *len_out gets its length. */
int hb_read_blob(hb_repo *r, const uint8_t id[HB_ID_LEN], uint8_t *out, uint32_t cap,
                 uint32_t *len_out, hb_error *err);

/* Close the current pack: fsync, publish the pack, then its index (hb_publish_pack's order). */
int hb_flush(hb_repo *r, hb_error *err);

/*
 * Index files and the publication order (docs/repository-format.md sections 4 and 6), for
 * packs written elsewhere (the media service receives them); the pack writer above goes
 * through the same code. `entries` holds `count` index entries of HB_INDEX_ENTRY_LEN bytes in
 * the format's layout; `name` is a pack's NAME (2 * HB_PACK_ID_LEN lowercase hex characters).
 */

/* Encode the index file of pack `pack_id` into out, whose capacity `cap` must be at least
 * HB_INDEX_HEADER_LEN + count * HB_INDEX_ENTRY_LEN + HB_ID_LEN; *len_out gets the length. */
int hb_index_encode(const uint8_t pack_id[HB_PACK_ID_LEN], const uint8_t *entries, uint32_t count,
                    uint8_t *out, uint64_t cap, uint64_t *len_out, hb_error *err);

/* Publish index/<name> in the repository at `root`: write tmp/<name>.idx, fsync it, rename it
 * to index/<name>, fsync index/. */
int hb_publish_index(const char *root, const char *name, const uint8_t *entries, uint32_t count,
                     hb_error *err);

/* Publish the pack file `staged` (in root's tmp/) as packs/XX/<name>, then its index: fsync it,
 * create packs/XX and fsync packs/, rename, fsync packs/XX; then as hb_publish_index. */
int hb_publish_pack(const char *root, const char *name, const char *staged, const uint8_t *entries,
                    uint32_t count, hb_error *err);

/*
 * Restore `nchunks` chunks (ids: nchunks * 32 bytes, all-zero id = zero chunk)
 * to `fd` starting at chunk index first_chunk. Zero chunks are written only if
 * write_zeros (a target that is not known to read back zeros, e.g. a device).
 * Every chunk is verified before it is written.
 */
int hb_restore_segment(hb_repo *r, int fd, uint64_t first_chunk, uint64_t size,
                       uint32_t nchunks, const uint8_t *ids, int write_zeros,
                       int threads, hb_progress *progress, hb_error *err);

/*
 * Read `nchunks` chunks (ids as for hb_restore_segment) of an image of `size` bytes, starting at
 * chunk index first_chunk, into memory: chunk i at out + i * chunk_size (an image's bytes as they
 * lie), zero chunks as zeros. `cap` must hold them all. Every chunk is verified; with `threads`
 * workers, so that a random read of a few chunks does not wait on one core (an export's reads).
 */
int hb_read_segment(hb_repo *r, uint64_t first_chunk, uint64_t size, uint32_t nchunks,
                    const uint8_t *ids, uint8_t *out, uint64_t cap, int threads,
                    hb_progress *progress, hb_error *err);

/*
 * Verify index entries: every entry whose id falls in the sample (per_10000 out
 * of 10000, chosen by id) is read, decompressed and re-hashed. Ids of bad blobs
 * are written to bad_ids (up to bad_cap); *nbad counts all of them.
 */
int hb_verify_index(hb_repo *r, uint32_t per_10000, int threads, uint8_t *bad_ids,
                    uint32_t bad_cap, uint32_t *nbad, hb_progress *progress,
                    hb_error *err);

/* SHA-256 of a buffer, for the self-test against hashlib. */
int hb_hash(const uint8_t *data, uint64_t len, uint8_t out[HB_ID_LEN]);

#endif
