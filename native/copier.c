/*
 * hyperback native copier. See copier.h for the contract and
 * docs/repository-format.md for the pack and index formats written here.
 *
 * Concurrency: worker threads share one chunk index (open addressing, one
 * mutex) and one pack writer (one mutex held for each append, so a pack is
 * always a gapless sequence of records). The index never resizes while
 * workers run: every entry point reserves room first.
 */
#define _GNU_SOURCE
#include "copier.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <zstd.h>

#define PACK_MAGIC "HBPK"
#define INDEX_MAGIC "HBIX"
#define FORMAT_VERSION 1u
#define PACK_HEADER_LEN 40u   /* magic 4, version 4, pack id 16, writer id 16 */
#define RECORD_HEADER_LEN 44u /* id 32, type 1, comp 1, reserved 2, raw len 4, stored len 4 */
#define BATCH_CHUNKS 16u
#define VERIFY_BATCH_SLOTS 4096u
#define FD_CACHE 8
#define MAX_WRITERS 64
#define WRITE_BUFFER (1u << 20)
/* Compressing random data costs as much as compressing text and saves nothing:
 * a chunk whose middle SAMPLE_LEN bytes shrink by less than 1/32 is stored raw. */
#define SAMPLE_LEN 4096u
/* An encrypted record's payload: nonce | ciphertext | tag (repository-format section 11). */
#define SEAL_LEN (HB_NONCE_LEN + HB_TAG_LEN)

#define SLOT_EMPTY 0
#define SLOT_PRESENT 1
#define SLOT_PENDING 2 /* being written by a worker of this process */

typedef struct {
    uint8_t id[HB_ID_LEN];
    uint64_t offset;
    uint32_t pack;
    uint32_t stored_len;
    uint32_t raw_len;
    uint8_t type, comp, state, pad;
} slot_t;

typedef struct {
    char name[33];
    int published;
    uint32_t writer; /* while unpublished: the slot writing it */
} pack_t;

typedef struct {
    uint8_t id[HB_ID_LEN];
    uint8_t type, comp;
    uint64_t offset;
    uint32_t stored_len, raw_len;
} record_t;

/* A pack being written: records gather in buf and reach the file a megabyte at a time. */
typedef struct {
    pthread_mutex_t lock;
    int fd;
    uint32_t pack;
    uint64_t off;       /* end of the pack, buffered bytes included */
    uint8_t *buf;
    size_t buf_len, buf_cap;
    uint64_t buf_at;    /* file offset of buf[0] */
    uint8_t *entries;   /* the pack's index entries, laid out as in its index file */
    uint32_t nentries, entries_cap;
} writer_t;

/* per-thread working state */
typedef struct {
    uint8_t *buf;   /* raw chunk */
    uint8_t *cbuf;  /* record header + compressed payload */
    size_t cbuf_cap;
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    EVP_MD_CTX *md;
    EVP_MAC_CTX *mac;      /* encrypted repositories: HMAC keyed with the id key */
    EVP_CIPHER_CTX *seal;  /* AES-256-GCM keyed for encryption; only the nonce changes per record */
    EVP_CIPHER_CTX *open;  /* and for decryption */
    struct { uint32_t pack; int fd; } fds[FD_CACHE];
    int fd_next;
    uint32_t slot; /* the writer slot this worker appends to */
} worker_t;

struct hb_repo {
    char *root;
    uint8_t writer_id[16];
    uint32_t chunk_size;
    uint64_t pack_target;
    int level;
    int poisoned; /* atomic; a write failed: the index may name chunks that never became durable */
    int encrypted;
    uint8_t aead_key[HB_KEY_LEN];
    EVP_MAC_CTX *id_mac; /* keyed once; workers take copies, since a key setup per chunk costs two blocks */

    pthread_mutex_t ix_lock;
    slot_t *slots;
    uint64_t cap, count;
    pack_t *packs;
    uint32_t npacks, packs_cap;

    /* One open pack per writer slot, so that workers never wait for each other's writes. */
    writer_t writers[MAX_WRITERS];

    /* working state for the single-blob calls, made once: a zstd context is costly */
    pthread_mutex_t solo_lock;
    worker_t *solo;
};

static const uint8_t ZERO_ID[HB_ID_LEN];
static EVP_MD *sha256_md;
static EVP_MAC *hmac_alg;
static EVP_CIPHER *gcm_cipher;
static pthread_once_t md_once = PTHREAD_ONCE_INIT;

/* Fetched once: an implicit fetch on every init takes a lock that threads would contend for. */
static void md_init(void)
{
    sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
    hmac_alg = EVP_MAC_fetch(NULL, "HMAC", NULL);
    gcm_cipher = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
}

static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get32(const uint8_t *p) { uint32_t v = 0; for (int i = 3; i >= 0; i--) v = (v << 8) | p[i]; return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v = 0; for (int i = 7; i >= 0; i--) v = (v << 8) | p[i]; return v; }

/* Bytes in the index file of a pack of `count` records: header, entries, checksum. */
static uint64_t index_len(uint32_t count)
{
    return HB_INDEX_HEADER_LEN + (uint64_t)count * HB_INDEX_ENTRY_LEN + HB_ID_LEN;
}

static void add(uint64_t *counter, uint64_t v) { __atomic_add_fetch(counter, v, __ATOMIC_RELAXED); }
static int cancelled(hb_progress *p) { return p && __atomic_load_n(&p->cancel, __ATOMIC_RELAXED); }

static int fail(hb_error *e, int code, int err_no, int where, const uint8_t *id)
{
    if (e) {
        e->code = code;
        e->err_no = err_no;
        e->where = where;
        if (id) memcpy(e->id, id, HB_ID_LEN);
        else memset(e->id, 0, HB_ID_LEN);
    }
    return code;
}

static int sys_fail(hb_error *e, int where) { return fail(e, HB_ESYS, errno, where, NULL); }

static int is_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

static int hash_with(EVP_MD_CTX *md, const uint8_t *data, size_t len, uint8_t out[HB_ID_LEN])
{
    unsigned int n = 0;
    if (!EVP_DigestInit_ex2(md, sha256_md, NULL) || !EVP_DigestUpdate(md, data, len) ||
        !EVP_DigestFinal_ex(md, out, &n))
        return -1;
    return 0;
}

/* A chunk's id: SHA-256 of its bytes, or HMAC-SHA256 under the id key in an encrypted repository. */
static int id_of(const worker_t *w, const uint8_t *data, size_t len, uint8_t out[HB_ID_LEN])
{
    size_t n = 0;
    if (!w->mac) return hash_with(w->md, data, len, out);
    /* a NULL key restarts HMAC with the key already set */
    if (!EVP_MAC_init(w->mac, NULL, 0, NULL) || !EVP_MAC_update(w->mac, data, len) ||
        !EVP_MAC_final(w->mac, out, &n, HB_ID_LEN) || n != HB_ID_LEN)
        return -1;
    return 0;
}

/* Seal `n` bytes at text in place; the nonce goes just before text, the tag just after it.
 * The record's header (RECORD_HEADER_LEN bytes at aad) is the associated data. */
static int seal(worker_t *w, const uint8_t *aad, uint8_t *text, size_t n)
{
    uint8_t *nonce = text - HB_NONCE_LEN;
    int outl = 0, fin = 0;
    if (RAND_bytes(nonce, HB_NONCE_LEN) != 1 || !EVP_EncryptInit_ex(w->seal, NULL, NULL, NULL, nonce) ||
        !EVP_EncryptUpdate(w->seal, NULL, &outl, aad, RECORD_HEADER_LEN) ||
        !EVP_EncryptUpdate(w->seal, text, &outl, text, (int)n) ||
        !EVP_EncryptFinal_ex(w->seal, text + outl, &fin) ||
        !EVP_CIPHER_CTX_ctrl(w->seal, EVP_CTRL_GCM_GET_TAG, HB_TAG_LEN, text + n))
        return -1;
    return 0;
}

/* Open a sealed payload (nonce | ciphertext of n bytes | tag) into out; -1 unless the tag holds. */
static int unseal(worker_t *w, const uint8_t *aad, const uint8_t *payload, size_t n, uint8_t *out)
{
    const uint8_t *text = payload + HB_NONCE_LEN;
    int outl = 0, fin = 0;
    if (!EVP_DecryptInit_ex(w->open, NULL, NULL, NULL, payload) ||
        !EVP_DecryptUpdate(w->open, NULL, &outl, aad, RECORD_HEADER_LEN) ||
        !EVP_DecryptUpdate(w->open, out, &outl, text, (int)n) ||
        !EVP_CIPHER_CTX_ctrl(w->open, EVP_CTRL_GCM_SET_TAG, HB_TAG_LEN, (void *)(text + n)) ||
        EVP_DecryptFinal_ex(w->open, out + outl, &fin) <= 0)
        return -1;
    return 0;
}

int hb_hash(const uint8_t *data, uint64_t len, uint8_t out[HB_ID_LEN])
{
    pthread_once(&md_once, md_init);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    if (!md) return HB_ENOMEM;
    int rc = hash_with(md, data, len, out) ? HB_EARG : HB_OK;
    EVP_MD_CTX_free(md);
    return rc;
}

/* ---------- I/O helpers ---------- */

static int pread_full(int fd, uint8_t *buf, size_t len, uint64_t off, size_t *got)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) break;
        done += (size_t)n;
    }
    *got = done;
    return 0;
}

static int pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, buf + done, len - done, (off_t)(off + done));
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        done += (size_t)n;
    }
    return 0;
}

static int fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

static void hex(const uint8_t *b, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = 0;
}

static int unhex(const char *s, uint8_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int v = 0;
        for (int k = 0; k < 2; k++) {
            char c = s[2 * i + k];
            int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
            if (d < 0) return -1;
            v = v * 16 + d;
        }
        out[i] = (uint8_t)v;
    }
    return s[2 * n] == 0 ? 0 : -1;
}

static void pack_path(const hb_repo *r, const pack_t *p, char *out, size_t cap)
{
    if (p->published) snprintf(out, cap, "%s/packs/%.2s/%s", r->root, p->name, p->name);
    else snprintf(out, cap, "%s/tmp/%s.pack", r->root, p->name);
}

/* ---------- the chunk index ---------- */

static uint64_t slot_of(const hb_repo *r, const uint8_t *id)
{
    uint64_t h;
    memcpy(&h, id, sizeof h);
    return h & (r->cap - 1);
}

static slot_t *find_slot(hb_repo *r, const uint8_t *id)
{
    for (uint64_t i = slot_of(r, id);; i = (i + 1) & (r->cap - 1)) {
        slot_t *s = &r->slots[i];
        if (s->state == SLOT_EMPTY || memcmp(s->id, id, HB_ID_LEN) == 0) return s;
    }
}

/* Grow so that `more` insertions keep the load factor under 3/4. Caller holds ix_lock or is alone. */
static int reserve_locked(hb_repo *r, uint64_t more)
{
    uint64_t need = r->count + more;
    if (need * 4 < r->cap * 3) return 0;
    uint64_t cap = r->cap ? r->cap : 1024;
    while (need * 4 >= cap * 3) cap *= 2;
    slot_t *old = r->slots;
    uint64_t old_cap = r->cap;
    slot_t *fresh = calloc(cap, sizeof *fresh);
    if (!fresh) return -1;
    r->slots = fresh;
    r->cap = cap;
    for (uint64_t i = 0; i < old_cap; i++)
        if (old[i].state != SLOT_EMPTY) *find_slot(r, old[i].id) = old[i];
    free(old);
    return 0;
}

int hb_index_reserve(hb_repo *r, uint64_t more, hb_error *err)
{
    pthread_mutex_lock(&r->ix_lock);
    int rc = reserve_locked(r, more);
    pthread_mutex_unlock(&r->ix_lock);
    return rc ? fail(err, HB_ENOMEM, ENOMEM, 0, NULL) : HB_OK;
}

uint64_t hb_index_count(hb_repo *r) { return r->count; }

int hb_index_contains(hb_repo *r, const uint8_t id[HB_ID_LEN])
{
    pthread_mutex_lock(&r->ix_lock);
    int found = r->cap && find_slot(r, id)->state == SLOT_PRESENT;
    pthread_mutex_unlock(&r->ix_lock);
    return found;
}

/* Copy a present entry out; returns 0 if absent or still pending. */
static int lookup(hb_repo *r, const uint8_t *id, slot_t *out)
{
    pthread_mutex_lock(&r->ix_lock);
    slot_t *s = r->cap ? find_slot(r, id) : NULL;
    int found = s && s->state == SLOT_PRESENT;
    if (found) *out = *s;
    pthread_mutex_unlock(&r->ix_lock);
    return found;
}

/* Claim an id for writing. Returns 1 if someone has it already, 0 if claimed (pending). */
static int claim(hb_repo *r, const uint8_t *id)
{
    pthread_mutex_lock(&r->ix_lock);
    slot_t *s = find_slot(r, id);
    int had = s->state != SLOT_EMPTY;
    if (!had) {
        memcpy(s->id, id, HB_ID_LEN);
        s->state = SLOT_PENDING;
        r->count++;
    }
    pthread_mutex_unlock(&r->ix_lock);
    return had;
}

static void settle(hb_repo *r, const record_t *rec, uint32_t pack)
{
    pthread_mutex_lock(&r->ix_lock);
    slot_t *s = find_slot(r, rec->id);
    s->offset = rec->offset;
    s->pack = pack;
    s->stored_len = rec->stored_len;
    s->raw_len = rec->raw_len;
    s->type = rec->type;
    s->comp = rec->comp;
    s->state = SLOT_PRESENT;
    pthread_mutex_unlock(&r->ix_lock);
}

static int add_pack(hb_repo *r, const char *name, int published, uint32_t *no)
{
    if (r->npacks == r->packs_cap) {
        uint32_t cap = r->packs_cap ? r->packs_cap * 2 : 64;
        pack_t *p = realloc(r->packs, cap * sizeof *p);
        if (!p) return -1;
        r->packs = p;
        r->packs_cap = cap;
    }
    pack_t *p = &r->packs[r->npacks];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->published = published;
    *no = r->npacks++;
    return 0;
}

int hb_index_load(hb_repo *r, const char *pack_name, hb_error *err)
{
    uint8_t pack_id[16];
    if (unhex(pack_name, pack_id, 16)) return fail(err, HB_EARG, EINVAL, 0, NULL);
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/index/%s", r->root, pack_name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return sys_fail(err, HB_AT_REPO_READ);
    struct stat st;
    if (fstat(fd, &st)) {
        int rc = sys_fail(err, HB_AT_REPO_READ);
        close(fd);
        return rc;
    }
    size_t len = (size_t)st.st_size;
    uint8_t *buf = malloc(len ? len : 1);
    size_t got = 0;
    if (!buf) {
        close(fd);
        return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    }
    int rdfail = pread_full(fd, buf, len, 0, &got);
    int rd_errno = errno;
    close(fd);
    int rc = HB_OK;
    uint8_t digest[HB_ID_LEN];
    if (rdfail) {
        rc = fail(err, HB_ESYS, rd_errno, HB_AT_REPO_READ, NULL);
    } else if (got != len || len < HB_INDEX_HEADER_LEN + HB_ID_LEN || memcmp(buf, INDEX_MAGIC, 4) ||
               get32(buf + 4) != FORMAT_VERSION || memcmp(buf + 8, pack_id, 16) ||
               len != index_len(get32(buf + 24)) ||
               hb_hash(buf, len - HB_ID_LEN, digest) || memcmp(digest, buf + len - HB_ID_LEN, HB_ID_LEN)) {
        rc = fail(err, HB_EFORMAT, 0, HB_AT_REPO_READ, NULL);
    }
    if (rc == HB_OK) {
        uint32_t n = get32(buf + 24), no = 0;
        pthread_mutex_lock(&r->ix_lock);
        if (reserve_locked(r, n) || add_pack(r, pack_name, 1, &no)) {
            rc = fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
        } else {
            for (uint32_t i = 0; i < n; i++) {
                const uint8_t *e = buf + HB_INDEX_HEADER_LEN + (size_t)i * HB_INDEX_ENTRY_LEN;
                slot_t *s = find_slot(r, e);
                if (s->state != SLOT_EMPTY) continue; /* the same chunk in two packs: either will do */
                memcpy(s->id, e, HB_ID_LEN);
                s->type = e[32];
                s->comp = e[33];
                s->offset = get64(e + 36);
                s->stored_len = get32(e + 44);
                s->raw_len = get32(e + 48);
                s->pack = no;
                s->state = SLOT_PRESENT;
                r->count++;
            }
        }
        pthread_mutex_unlock(&r->ix_lock);
    }
    free(buf);
    return rc;
}

/* ---------- workers ---------- */

static void worker_free(worker_t *w)
{
    free(w->buf);
    free(w->cbuf);
    ZSTD_freeCCtx(w->cctx);
    ZSTD_freeDCtx(w->dctx);
    EVP_MD_CTX_free(w->md);
    EVP_MAC_CTX_free(w->mac);
    EVP_CIPHER_CTX_free(w->seal);
    EVP_CIPHER_CTX_free(w->open);
    for (int i = 0; i < FD_CACHE; i++)
        if (w->fds[i].fd >= 0) close(w->fds[i].fd);
}

static int worker_keys(worker_t *w, const hb_repo *r)
{
    w->mac = EVP_MAC_CTX_dup(r->id_mac);
    w->seal = EVP_CIPHER_CTX_new();
    w->open = EVP_CIPHER_CTX_new();
    return !w->mac || !w->seal || !w->open ||
           !EVP_EncryptInit_ex(w->seal, gcm_cipher, NULL, r->aead_key, NULL) ||
           !EVP_DecryptInit_ex(w->open, gcm_cipher, NULL, r->aead_key, NULL);
}

static int worker_init(worker_t *w, const hb_repo *r)
{
    memset(w, 0, sizeof *w);
    for (int i = 0; i < FD_CACHE; i++) w->fds[i].fd = -1;
    w->cbuf_cap = RECORD_HEADER_LEN + ZSTD_compressBound(r->chunk_size) + SEAL_LEN;
    w->buf = malloc(r->chunk_size);
    w->cbuf = malloc(w->cbuf_cap);
    w->cctx = ZSTD_createCCtx();
    w->dctx = ZSTD_createDCtx();
    w->md = EVP_MD_CTX_new();
    if (!w->buf || !w->cbuf || !w->cctx || !w->dctx || !w->md || (r->encrypted && worker_keys(w, r))) {
        worker_free(w);
        return -1;
    }
    return 0;
}

static int pack_fd(hb_repo *r, worker_t *w, uint32_t pack)
{
    for (int i = 0; i < FD_CACHE; i++)
        if (w->fds[i].fd >= 0 && w->fds[i].pack == pack) return w->fds[i].fd;
    char path[PATH_MAX];
    pthread_mutex_lock(&r->ix_lock);
    pack_path(r, &r->packs[pack], path, sizeof path);
    pthread_mutex_unlock(&r->ix_lock);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int k = w->fd_next++ % FD_CACHE;
    if (w->fds[k].fd >= 0) close(w->fds[k].fd);
    w->fds[k].fd = fd;
    w->fds[k].pack = pack;
    return fd;
}

static int ensure_written(hb_repo *r, uint32_t pack, hb_error *err);

/* Read, decompress and verify the blob described by s into out. */
static int read_verified(hb_repo *r, worker_t *w, const slot_t *s, uint8_t *out, uint32_t cap,
                         hb_error *err)
{
    size_t want = RECORD_HEADER_LEN + (size_t)s->stored_len, got = 0;
    if (want > w->cbuf_cap || s->raw_len > cap) return fail(err, HB_ECORRUPT, 0, HB_AT_REPO_READ, s->id);
    int rc = ensure_written(r, s->pack, err);
    if (rc != HB_OK) return rc;
    int fd = pack_fd(r, w, s->pack);
    if (fd < 0 || pread_full(fd, w->cbuf, want, s->offset, &got))
        return fail(err, HB_ESYS, errno, HB_AT_REPO_READ, s->id);
    const uint8_t *h = w->cbuf;
    if (got != want || memcmp(h, s->id, HB_ID_LEN) || h[32] != s->type || h[33] != s->comp ||
        get32(h + 36) != s->raw_len || get32(h + 40) != s->stored_len)
        return fail(err, HB_ECORRUPT, 0, HB_AT_REPO_READ, s->id);
    uint8_t *payload = w->cbuf + RECORD_HEADER_LEN;
    size_t plen = s->stored_len;
    if (w->open) {
        if (plen < SEAL_LEN) return fail(err, HB_ECORRUPT, 0, HB_AT_REPO_READ, s->id);
        plen -= SEAL_LEN;
        /* a stored (uncompressed) payload opens straight into out */
        uint8_t *clear = s->comp ? payload + HB_NONCE_LEN : out;
        if ((!s->comp && plen != s->raw_len) || unseal(w, h, payload, plen, clear))
            return fail(err, HB_ECORRUPT, 0, HB_AT_REPO_READ, s->id);
        payload = clear;
    }
    if (s->comp) {
        size_t n = ZSTD_decompressDCtx(w->dctx, out, cap, payload, plen);
        if (ZSTD_isError(n) || n != s->raw_len) return fail(err, HB_ECORRUPT, 0, HB_AT_REPO_READ, s->id);
    } else if (payload != out) {
        memcpy(out, payload, s->raw_len);
    }
    uint8_t digest[HB_ID_LEN];
    if (id_of(w, out, s->raw_len, digest) || memcmp(digest, s->id, HB_ID_LEN))
        return fail(err, HB_ECORRUPT, 0, HB_AT_REPO_READ, s->id);
    return HB_OK;
}

/* ---------- index files and publication (repository-format sections 4 and 6) ---------- */

int hb_index_encode(const uint8_t pack_id[HB_PACK_ID_LEN], const uint8_t *entries, uint32_t count,
                    uint8_t *out, uint64_t cap, uint64_t *len_out, hb_error *err)
{
    uint64_t len = index_len(count);
    if (cap < len) return fail(err, HB_EARG, EINVAL, 0, NULL);
    memcpy(out, INDEX_MAGIC, 4);
    put32(out + 4, FORMAT_VERSION);
    memcpy(out + 8, pack_id, HB_PACK_ID_LEN);
    put32(out + 24, count);
    put32(out + 28, 0);
    if (count) memcpy(out + HB_INDEX_HEADER_LEN, entries, (size_t)count * HB_INDEX_ENTRY_LEN);
    int rc = hb_hash(out, len - HB_ID_LEN, out + len - HB_ID_LEN);
    if (rc != HB_OK) return fail(err, rc, 0, 0, NULL);
    *len_out = len;
    return HB_OK;
}

/* A pack name, and a root short enough for every path built from the two; fills pack_id. */
static int check_names(const char *root, const char *name, uint8_t pack_id[HB_PACK_ID_LEN], hb_error *err)
{
    if (unhex(name, pack_id, HB_PACK_ID_LEN)) return fail(err, HB_EARG, EINVAL, 0, NULL);
    if (strlen(root) + 64 >= PATH_MAX) return fail(err, HB_ESYS, ENAMETOOLONG, HB_AT_REPO_WRITE, NULL);
    return HB_OK;
}

int hb_publish_index(const char *root, const char *name, const uint8_t *entries, uint32_t count,
                     hb_error *err)
{
    uint8_t pack_id[HB_PACK_ID_LEN];
    int rc = check_names(root, name, pack_id, err);
    if (rc != HB_OK) return rc;
    uint64_t len = index_len(count);
    uint8_t *buf = malloc(len);
    if (!buf) return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    rc = hb_index_encode(pack_id, entries, count, buf, len, &len, err);
    char tmp[PATH_MAX], final[PATH_MAX], dir[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s/tmp/%s.idx", root, name);
    snprintf(final, sizeof final, "%s/index/%s", root, name);
    snprintf(dir, sizeof dir, "%s/index", root);
    int fd = -1;
    if (rc == HB_OK && (fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0)
        rc = sys_fail(err, HB_AT_REPO_WRITE);
    if (fd >= 0) {
        if (pwrite_full(fd, buf, len, 0) || fsync(fd)) rc = sys_fail(err, HB_AT_REPO_WRITE);
        if (close(fd) && rc == HB_OK) rc = sys_fail(err, HB_AT_REPO_WRITE);
        /* the index appears under its name only whole and durable */
        if (rc == HB_OK && (rename(tmp, final) || fsync_dir(dir))) rc = sys_fail(err, HB_AT_REPO_WRITE);
        if (rc != HB_OK) unlink(tmp);
    }
    free(buf);
    return rc;
}

/* Make the pack open on `fd` (closed here in every case) durable, then visible as
 * packs/XX/<name>: an index must never name a pack that a crash could take back. */
static int publish_pack_file(const char *root, const char *name, const char *staged, int fd, hb_error *err)
{
    char packs[PATH_MAX], dir[PATH_MAX], final[PATH_MAX];
    snprintf(packs, sizeof packs, "%s/packs", root);
    snprintf(dir, sizeof dir, "%s/packs/%.2s", root, name);
    snprintf(final, sizeof final, "%s/packs/%.2s/%s", root, name, name);
    int rc = fsync(fd) ? sys_fail(err, HB_AT_REPO_WRITE) : HB_OK;
    if (close(fd) && rc == HB_OK) rc = sys_fail(err, HB_AT_REPO_WRITE);
    if (rc == HB_OK && mkdir(dir, 0755) && errno != EEXIST) rc = sys_fail(err, HB_AT_REPO_WRITE);
    /* packs/ first, so that a new packs/XX is durable before the pack that goes into it */
    if (rc == HB_OK && (fsync_dir(packs) || rename(staged, final) || fsync_dir(dir)))
        rc = sys_fail(err, HB_AT_REPO_WRITE);
    return rc;
}

int hb_publish_pack(const char *root, const char *name, const char *staged, const uint8_t *entries,
                    uint32_t count, hb_error *err)
{
    uint8_t pack_id[HB_PACK_ID_LEN];
    int rc = check_names(root, name, pack_id, err);
    if (rc != HB_OK) return rc;
    /* read-only is enough: on Linux fsync flushes the file's data whoever wrote it */
    int fd = open(staged, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return sys_fail(err, HB_AT_REPO_WRITE);
    rc = publish_pack_file(root, name, staged, fd, err);
    return rc == HB_OK ? hb_publish_index(root, name, entries, count, err) : rc;
}

/* ---------- the pack writers (caller holds the writer's lock) ---------- */

static int poisoned(hb_repo *r) { return __atomic_load_n(&r->poisoned, __ATOMIC_RELAXED); }
static void poison(hb_repo *r) { __atomic_store_n(&r->poisoned, 1, __ATOMIC_RELAXED); }

static int drain(writer_t *wr, hb_error *err)
{
    if (wr->buf_len && pwrite_full(wr->fd, wr->buf, wr->buf_len, wr->buf_at)) return sys_fail(err, HB_AT_REPO_WRITE);
    /* Start writeback now, so that the fsync closing the pack has little left to wait for. */
    sync_file_range(wr->fd, (off_t)wr->buf_at, (off_t)wr->buf_len, SYNC_FILE_RANGE_WRITE);
    wr->buf_at += wr->buf_len;
    wr->buf_len = 0;
    return HB_OK;
}

static int open_pack(hb_repo *r, writer_t *wr, uint32_t slot, hb_error *err)
{
    uint8_t pack_id[16];
    if (getrandom(pack_id, sizeof pack_id, 0) != sizeof pack_id) return sys_fail(err, HB_AT_REPO_WRITE);
    char name[33], path[PATH_MAX];
    hex(pack_id, 16, name);
    snprintf(path, sizeof path, "%s/tmp/%s.pack", r->root, name);
    if (!wr->buf) {
        size_t record_cap = RECORD_HEADER_LEN + ZSTD_compressBound(r->chunk_size) + SEAL_LEN;
        wr->buf_cap = WRITE_BUFFER > record_cap ? WRITE_BUFFER : record_cap;
        if (!(wr->buf = malloc(wr->buf_cap))) return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    }
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) return sys_fail(err, HB_AT_REPO_WRITE);
    uint32_t no = 0;
    pthread_mutex_lock(&r->ix_lock);
    int added = add_pack(r, name, 0, &no);
    if (!added) r->packs[no].writer = slot;
    pthread_mutex_unlock(&r->ix_lock);
    if (added) {
        close(fd);
        unlink(path);
        return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    }
    /* The header goes out at once: garbage collection tells whose pack this is by it. */
    uint8_t hdr[PACK_HEADER_LEN];
    memcpy(hdr, PACK_MAGIC, 4);
    put32(hdr + 4, FORMAT_VERSION);
    memcpy(hdr + 8, pack_id, 16);
    memcpy(hdr + 24, r->writer_id, 16);
    if (pwrite_full(fd, hdr, sizeof hdr, 0)) {
        int rc = sys_fail(err, HB_AT_REPO_WRITE);
        close(fd);
        unlink(path);
        return rc;
    }
    wr->fd = fd;
    wr->pack = no;
    wr->buf_at = PACK_HEADER_LEN;
    wr->buf_len = 0;
    wr->off = PACK_HEADER_LEN;
    wr->nentries = 0;
    return HB_OK;
}

/* Make a writer's pack durable and visible: the pack first, then its index (as hb_publish_pack). */
static int close_pack(hb_repo *r, writer_t *wr, hb_error *err)
{
    if (wr->fd < 0) return HB_OK;
    int rc = drain(wr, err);
    pthread_mutex_lock(&r->ix_lock);
    pack_t p = r->packs[wr->pack];
    pthread_mutex_unlock(&r->ix_lock);
    char staged[PATH_MAX];
    pack_path(r, &p, staged, sizeof staged);
    int fd = wr->fd;
    wr->fd = -1;
    if (rc != HB_OK) {
        close(fd); /* the write's error is the one to report; the pack stays in tmp/, unpublished */
        return rc;
    }
    rc = publish_pack_file(r->root, p.name, staged, fd, err);
    if (rc != HB_OK) return rc;
    /* readers of this pack open it by its new path from now on */
    pthread_mutex_lock(&r->ix_lock);
    r->packs[wr->pack].published = 1;
    pthread_mutex_unlock(&r->ix_lock);
    return hb_publish_index(r->root, p.name, wr->entries, wr->nentries, err);
}

/* Note a record appended to the writer's pack, as its index file will list it. */
static int push_entry(writer_t *wr, const record_t *rec)
{
    if (wr->nentries == wr->entries_cap) {
        uint32_t cap = wr->entries_cap ? wr->entries_cap * 2 : 4096;
        uint8_t *p = realloc(wr->entries, (size_t)cap * HB_INDEX_ENTRY_LEN);
        if (!p) return -1;
        wr->entries = p;
        wr->entries_cap = cap;
    }
    uint8_t *e = wr->entries + (size_t)wr->nentries++ * HB_INDEX_ENTRY_LEN;
    memcpy(e, rec->id, HB_ID_LEN);
    e[32] = rec->type;
    e[33] = rec->comp;
    e[34] = e[35] = 0;
    put64(e + 36, rec->offset);
    put32(e + 44, rec->stored_len);
    put32(e + 48, rec->raw_len);
    return 0;
}

/* Before reading from a pack still being written, push its buffered bytes to the file. */
static int ensure_written(hb_repo *r, uint32_t pack, hb_error *err)
{
    pthread_mutex_lock(&r->ix_lock);
    int published = r->packs[pack].published;
    uint32_t slot = r->packs[pack].writer;
    pthread_mutex_unlock(&r->ix_lock);
    if (published) return HB_OK;
    writer_t *wr = &r->writers[slot];
    pthread_mutex_lock(&wr->lock);
    int rc = wr->fd >= 0 && wr->pack == pack ? drain(wr, err) : HB_OK;
    pthread_mutex_unlock(&wr->lock);
    return rc;
}

/* Compress and append a claimed chunk to this worker's pack; settles its index slot. */
static int store_claimed(hb_repo *r, worker_t *w, const uint8_t *id, const uint8_t *data, uint32_t len,
                         int type, hb_progress *p, hb_error *err)
{
    size_t sealed = w->seal ? SEAL_LEN : 0;
    uint8_t *payload = w->cbuf + RECORD_HEADER_LEN + (sealed ? HB_NONCE_LEN : 0);
    size_t cap = w->cbuf_cap - RECORD_HEADER_LEN - sealed, n = len;
    int worth = 1;
    if (len >= 4 * SAMPLE_LEN) {
        size_t s = ZSTD_compressCCtx(w->cctx, payload, cap, data + (len - SAMPLE_LEN) / 2, SAMPLE_LEN, r->level);
        worth = !ZSTD_isError(s) && s < SAMPLE_LEN - SAMPLE_LEN / 32;
    }
    if (worth) n = ZSTD_compressCCtx(w->cctx, payload, cap, data, len, r->level);
    record_t rec;
    memcpy(rec.id, id, HB_ID_LEN);
    rec.type = (uint8_t)type;
    rec.raw_len = len;
    if (!worth || ZSTD_isError(n) || n >= len) {
        memcpy(payload, data, len);
        rec.comp = 0;
        n = len;
    } else {
        rec.comp = 1;
    }
    rec.stored_len = (uint32_t)(n + sealed);
    uint8_t *h = w->cbuf;
    memcpy(h, id, HB_ID_LEN);
    h[32] = rec.type;
    h[33] = rec.comp;
    h[34] = h[35] = 0;
    put32(h + 36, rec.raw_len);
    put32(h + 40, rec.stored_len);
    if (sealed && seal(w, h, payload, n)) {
        poison(r); /* the claimed slot will never be written */
        return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    }
    size_t total = RECORD_HEADER_LEN + rec.stored_len;

    writer_t *wr = &r->writers[w->slot];
    int rc = HB_OK;
    pthread_mutex_lock(&wr->lock);
    if (poisoned(r)) rc = fail(err, HB_EARG, EINVAL, HB_AT_REPO_WRITE, NULL);
    if (rc == HB_OK && wr->fd >= 0 && wr->off + total > r->pack_target) rc = close_pack(r, wr, err);
    if (rc == HB_OK && wr->fd < 0) rc = open_pack(r, wr, w->slot, err);
    if (rc == HB_OK && wr->buf_len + total > wr->buf_cap) rc = drain(wr, err);
    if (rc == HB_OK) {
        rec.offset = wr->off;
        memcpy(wr->buf + wr->buf_len, w->cbuf, total);
        wr->buf_len += total;
        if (push_entry(wr, &rec)) rc = fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
        else wr->off += total;
    }
    uint32_t pack = wr->pack;
    pthread_mutex_unlock(&wr->lock);
    if (rc != HB_OK) {
        poison(r);
        return rc;
    }
    settle(r, &rec, pack);
    if (p) {
        add(&p->bytes_new, len);
        add(&p->bytes_stored, total);
        add(&p->chunks_new, 1);
    }
    return HB_OK;
}

int hb_flush(hb_repo *r, hb_error *err)
{
    int rc = poisoned(r) ? fail(err, HB_EARG, EINVAL, HB_AT_REPO_WRITE, NULL) : HB_OK;
    for (uint32_t i = 0; i < MAX_WRITERS && rc == HB_OK; i++) {
        pthread_mutex_lock(&r->writers[i].lock);
        rc = close_pack(r, &r->writers[i], err);
        pthread_mutex_unlock(&r->writers[i].lock);
    }
    if (rc != HB_OK) poison(r);
    return rc;
}

/* ---------- parallel jobs ---------- */

typedef struct job job_t;
typedef int (*unit_fn)(job_t *j, worker_t *w, uint64_t unit);

struct job {
    hb_repo *r;
    unit_fn fn;
    uint64_t units;     /* number of work units */
    uint64_t batch;     /* units taken at a time */
    uint64_t next;      /* atomic cursor */
    uint32_t next_slot; /* atomic: writer slot of the next thread */
    int failed;         /* atomic */
    hb_error err;
    pthread_mutex_t err_lock;
    hb_progress *p;
    /* job-specific inputs */
    int fd;
    uint64_t first_chunk, size;
    const uint8_t *todo, *base_ids, *ids;
    const int32_t *chunk_fds;
    const uint64_t *chunk_offsets;
    uint8_t *out_ids, *out_state, *out;
    int write_zeros;
    uint32_t per_10000, bad_cap, nbad;
    uint8_t *bad_ids;
};

static void job_fail(job_t *j, const hb_error *e)
{
    pthread_mutex_lock(&j->err_lock);
    if (!j->failed) j->err = *e;
    __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&j->err_lock);
}

static void *job_thread(void *arg)
{
    job_t *j = arg;
    worker_t w;
    if (worker_init(&w, j->r)) {
        hb_error e = {HB_ENOMEM, ENOMEM, 0, {0}};
        job_fail(j, &e);
        return NULL;
    }
    /* Thread k of every job appends to pack slot k: packs fill up instead of multiplying. */
    w.slot = __atomic_fetch_add(&j->next_slot, 1, __ATOMIC_RELAXED) % MAX_WRITERS;
    for (;;) {
        if (__atomic_load_n(&j->failed, __ATOMIC_RELAXED)) break;
        if (cancelled(j->p)) {
            hb_error e = {HB_ESYS, ECANCELED, 0, {0}};
            job_fail(j, &e);
            break;
        }
        uint64_t start = __atomic_fetch_add(&j->next, j->batch, __ATOMIC_RELAXED);
        if (start >= j->units) break;
        uint64_t end = start + j->batch < j->units ? start + j->batch : j->units;
        for (uint64_t u = start; u < end; u++)
            if (j->fn(j, &w, u) != HB_OK) break; /* the unit recorded its error */
    }
    worker_free(&w);
    return NULL;
}

static int run_job(job_t *j, int threads, hb_error *err)
{
    pthread_mutex_init(&j->err_lock, NULL);
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    pthread_t tids[64];
    int started = 0;
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&tids[started], NULL, job_thread, j)) break;
        started++;
    }
    job_thread(j);
    for (int i = 0; i < started; i++) pthread_join(tids[i], NULL);
    pthread_mutex_destroy(&j->err_lock);
    if (j->failed) {
        if (err) *err = j->err;
        return j->err.code;
    }
    return HB_OK;
}

static uint32_t chunk_len(const job_t *j, uint64_t chunk)
{
    uint64_t off = chunk * j->r->chunk_size;
    uint64_t left = j->size > off ? j->size - off : 0;
    return (uint32_t)(left < j->r->chunk_size ? left : j->r->chunk_size);
}

/* ---------- backup ---------- */

static int backup_unit(job_t *j, worker_t *w, uint64_t i)
{
    hb_repo *r = j->r;
    uint64_t chunk = j->first_chunk + i;
    uint32_t len = chunk_len(j, chunk);
    uint8_t *id = j->out_ids + i * HB_ID_LEN;
    hb_error e;
    if (j->todo[i] == HB_TODO_KEEP) {
        memcpy(id, j->base_ids + i * HB_ID_LEN, HB_ID_LEN);
        j->out_state[i] = HB_CHUNK_KEPT;
        add(&j->p->bytes_done, len);
        return HB_OK;
    }
    if (j->todo[i] == HB_TODO_ZERO) {
        memset(id, 0, HB_ID_LEN);
        j->out_state[i] = HB_CHUNK_ZERO;
        add(&j->p->chunks_zero, 1);
        goto done;
    }
    size_t got = 0;
    int fd = j->chunk_fds ? j->chunk_fds[i] : j->fd;
    uint64_t at = j->chunk_offsets ? j->chunk_offsets[i] : chunk * r->chunk_size;
    if (pread_full(fd, w->buf, len, at, &got)) {
        fail(&e, HB_ESYS, errno, HB_AT_SOURCE, NULL);
        job_fail(j, &e);
        return e.code;
    }
    if (got != len) {
        fail(&e, HB_ESHORT, 0, HB_AT_SOURCE, NULL);
        job_fail(j, &e);
        return e.code;
    }
    add(&j->p->bytes_read, len);
    if (is_zero(w->buf, len)) {
        memset(id, 0, HB_ID_LEN);
        j->out_state[i] = HB_CHUNK_ZERO;
        add(&j->p->chunks_zero, 1);
        goto done;
    }
    if (id_of(w, w->buf, len, id)) {
        fail(&e, HB_ENOMEM, ENOMEM, 0, NULL);
        job_fail(j, &e);
        return e.code;
    }
    if (claim(r, id)) {
        j->out_state[i] = HB_CHUNK_DUP;
        add(&j->p->chunks_dup, 1);
    } else {
        j->out_state[i] = HB_CHUNK_NEW;
        int rc = store_claimed(r, w, id, w->buf, len, HB_BLOB_DATA, j->p, &e);
        if (rc != HB_OK) {
            if (e.where == HB_AT_REPO_WRITE) memcpy(e.id, id, HB_ID_LEN);
            job_fail(j, &e);
            return rc;
        }
    }
done:
    if (j->base_ids && memcmp(id, j->base_ids + i * HB_ID_LEN, HB_ID_LEN)) add(&j->p->bytes_changed, len);
    else if (!j->base_ids && j->out_state[i] != HB_CHUNK_ZERO) add(&j->p->bytes_changed, len);
    add(&j->p->bytes_done, len);
    return HB_OK;
}

int hb_backup_segment(hb_repo *r, int fd, uint64_t first_chunk, uint64_t src_size, uint32_t nchunks,
                      const uint8_t *todo, const uint8_t *base_ids, const int32_t *chunk_fds,
                      const uint64_t *chunk_offsets, uint8_t *out_ids, uint8_t *out_state,
                      int threads, hb_progress *progress, hb_error *err)
{
    if (poisoned(r) || !progress) return fail(err, HB_EARG, EINVAL, HB_AT_REPO_WRITE, NULL);
    if ((chunk_fds == NULL) != (chunk_offsets == NULL)) return fail(err, HB_EARG, EINVAL, 0, NULL);
    for (uint32_t i = 0; i < nchunks; i++)
        if (todo[i] > HB_TODO_KEEP || (todo[i] == HB_TODO_KEEP && !base_ids) ||
            (todo[i] == HB_TODO_READ && chunk_fds && chunk_fds[i] < 0))
            return fail(err, HB_EARG, EINVAL, 0, NULL);
    if (hb_index_reserve(r, nchunks, err)) return HB_ENOMEM;
    job_t j;
    memset(&j, 0, sizeof j);
    j.r = r;
    j.fn = backup_unit;
    j.units = nchunks;
    j.batch = BATCH_CHUNKS;
    j.p = progress;
    j.fd = fd;
    j.first_chunk = first_chunk;
    j.size = src_size;
    j.todo = todo;
    j.base_ids = base_ids;
    j.chunk_fds = chunk_fds;
    j.chunk_offsets = chunk_offsets;
    j.out_ids = out_ids;
    j.out_state = out_state;
    int rc = run_job(&j, threads, err);
    if (rc != HB_OK) {
        poison(r); /* claimed slots of this segment may never be written */
    }
    return rc;
}

/* Lock and return the single-call worker, creating it on first use; NULL (unlocked) if out of memory. */
static worker_t *solo_worker(hb_repo *r)
{
    pthread_mutex_lock(&r->solo_lock);
    if (!r->solo) {
        worker_t *w = malloc(sizeof *w);
        if (!w || worker_init(w, r)) {
            free(w);
            pthread_mutex_unlock(&r->solo_lock);
            return NULL;
        }
        r->solo = w;
    }
    return r->solo;
}

int hb_store_blob(hb_repo *r, const uint8_t *data, uint32_t len, int type, uint8_t id_out[HB_ID_LEN],
                  int *was_new, hb_error *err)
{
    if (len > r->chunk_size) return fail(err, HB_EARG, EINVAL, 0, NULL);
    pthread_once(&md_once, md_init);
    if (hb_index_reserve(r, 1, err)) return HB_ENOMEM;
    worker_t *w = solo_worker(r);
    if (!w) return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    int rc = HB_OK;
    *was_new = 0;
    if (id_of(w, data, len, id_out)) rc = fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    else if (!claim(r, id_out)) {
        *was_new = 1;
        rc = store_claimed(r, w, id_out, data, len, type, NULL, err);
    }
    pthread_mutex_unlock(&r->solo_lock);
    return rc;
}

int hb_read_blob(hb_repo *r, const uint8_t id[HB_ID_LEN], uint8_t *out, uint32_t cap, uint32_t *len_out,
                 hb_error *err)
{
    pthread_once(&md_once, md_init);
    slot_t s;
    if (!lookup(r, id, &s)) return fail(err, HB_EMISSING, 0, HB_AT_REPO_READ, id);
    worker_t *w = solo_worker(r);
    if (!w) return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    int rc = read_verified(r, w, &s, out, cap, err);
    pthread_mutex_unlock(&r->solo_lock);
    if (rc == HB_OK) *len_out = s.raw_len;
    return rc;
}

/* ---------- restore ---------- */

static int restore_unit(job_t *j, worker_t *w, uint64_t i)
{
    hb_repo *r = j->r;
    uint64_t chunk = j->first_chunk + i;
    uint32_t len = chunk_len(j, chunk);
    const uint8_t *id = j->ids + i * HB_ID_LEN;
    uint64_t off = chunk * r->chunk_size;
    hb_error e;
    if (memcmp(id, ZERO_ID, HB_ID_LEN) == 0) {
        if (j->write_zeros) {
            memset(w->buf, 0, len);
            if (pwrite_full(j->fd, w->buf, len, off)) goto target_error;
        }
        add(&j->p->bytes_done, len);
        return HB_OK;
    }
    slot_t s;
    if (!lookup(r, id, &s)) {
        fail(&e, HB_EMISSING, 0, HB_AT_REPO_READ, id);
        job_fail(j, &e);
        return e.code;
    }
    if (s.raw_len != len) {
        fail(&e, HB_ECORRUPT, 0, HB_AT_REPO_READ, id);
        job_fail(j, &e);
        return e.code;
    }
    int rc = read_verified(r, w, &s, w->buf, r->chunk_size, &e);
    if (rc != HB_OK) {
        job_fail(j, &e);
        return rc;
    }
    add(&j->p->bytes_read, RECORD_HEADER_LEN + s.stored_len);
    if (pwrite_full(j->fd, w->buf, len, off)) goto target_error;
    add(&j->p->bytes_done, len);
    return HB_OK;
target_error:
    fail(&e, HB_ESYS, errno, HB_AT_TARGET, NULL);
    job_fail(j, &e);
    return e.code;
}

int hb_restore_segment(hb_repo *r, int fd, uint64_t first_chunk, uint64_t size, uint32_t nchunks,
                       const uint8_t *ids, int write_zeros, int threads, hb_progress *progress, hb_error *err)
{
    if (!progress) return fail(err, HB_EARG, EINVAL, 0, NULL);
    pthread_once(&md_once, md_init);
    job_t j;
    memset(&j, 0, sizeof j);
    j.r = r;
    j.fn = restore_unit;
    j.units = nchunks;
    j.batch = BATCH_CHUNKS;
    j.p = progress;
    j.fd = fd;
    j.first_chunk = first_chunk;
    j.size = size;
    j.ids = ids;
    j.write_zeros = write_zeros;
    return run_job(&j, threads, err);
}

/* ---------- reads into memory (exports) ---------- */

static int read_unit(job_t *j, worker_t *w, uint64_t i)
{
    hb_repo *r = j->r;
    uint32_t len = chunk_len(j, j->first_chunk + i);
    const uint8_t *id = j->ids + i * HB_ID_LEN;
    uint8_t *out = j->out + i * r->chunk_size;
    hb_error e;
    if (memcmp(id, ZERO_ID, HB_ID_LEN) == 0) {
        memset(out, 0, len);
        add(&j->p->bytes_done, len);
        return HB_OK;
    }
    slot_t s;
    if (!lookup(r, id, &s)) {
        fail(&e, HB_EMISSING, 0, HB_AT_REPO_READ, id);
        job_fail(j, &e);
        return e.code;
    }
    if (s.raw_len != len) {
        fail(&e, HB_ECORRUPT, 0, HB_AT_REPO_READ, id);
        job_fail(j, &e);
        return e.code;
    }
    int rc = read_verified(r, w, &s, out, len, &e);
    if (rc != HB_OK) {
        job_fail(j, &e);
        return rc;
    }
    add(&j->p->bytes_read, RECORD_HEADER_LEN + s.stored_len);
    add(&j->p->bytes_done, len);
    return HB_OK;
}

int hb_read_segment(hb_repo *r, uint64_t first_chunk, uint64_t size, uint32_t nchunks,
                    const uint8_t *ids, uint8_t *out, uint64_t cap, int threads,
                    hb_progress *progress, hb_error *err)
{
    if (!progress || !nchunks) return fail(err, HB_EARG, EINVAL, 0, NULL);
    pthread_once(&md_once, md_init);
    job_t j;
    memset(&j, 0, sizeof j);
    j.r = r;
    j.fn = read_unit;
    j.units = nchunks;
    j.batch = 1; /* a read is a few chunks: one each, so every worker gets some */
    j.p = progress;
    j.first_chunk = first_chunk;
    j.size = size;
    j.ids = ids;
    j.out = out;
    uint64_t last = first_chunk + nchunks - 1;
    if ((uint64_t)(nchunks - 1) * r->chunk_size + chunk_len(&j, last) > cap || last * r->chunk_size >= size)
        return fail(err, HB_EARG, EINVAL, 0, NULL);
    if ((uint64_t)threads > nchunks) threads = (int)nchunks;
    return run_job(&j, threads, err);
}

/* ---------- verify ---------- */

static int verify_unit(job_t *j, worker_t *w, uint64_t batch_no)
{
    hb_repo *r = j->r;
    uint64_t start = batch_no * VERIFY_BATCH_SLOTS;
    uint64_t end = start + VERIFY_BATCH_SLOTS < r->cap ? start + VERIFY_BATCH_SLOTS : r->cap;
    for (uint64_t i = start; i < end; i++) {
        slot_t s = r->slots[i]; /* no writer runs during verify: the table is stable */
        if (s.state != SLOT_PRESENT || get32(s.id + 8) % 10000 >= j->per_10000) continue;
        hb_error e;
        if (read_verified(r, w, &s, w->buf, r->chunk_size, &e) == HB_OK) {
            add(&j->p->bytes_read, s.raw_len);
            continue;
        }
        pthread_mutex_lock(&j->err_lock);
        if (j->nbad < j->bad_cap) memcpy(j->bad_ids + (size_t)j->nbad * HB_ID_LEN, s.id, HB_ID_LEN);
        j->nbad++;
        pthread_mutex_unlock(&j->err_lock);
    }
    add(&j->p->bytes_done, end - start);
    return HB_OK;
}

int hb_verify_index(hb_repo *r, uint32_t per_10000, int threads, uint8_t *bad_ids, uint32_t bad_cap,
                    uint32_t *nbad, hb_progress *progress, hb_error *err)
{
    if (!progress) return fail(err, HB_EARG, EINVAL, 0, NULL);
    pthread_once(&md_once, md_init);
    job_t j;
    memset(&j, 0, sizeof j);
    j.r = r;
    j.fn = verify_unit;
    j.units = (r->cap + VERIFY_BATCH_SLOTS - 1) / VERIFY_BATCH_SLOTS;
    j.batch = 1;
    j.p = progress;
    j.per_10000 = per_10000;
    j.bad_ids = bad_ids;
    j.bad_cap = bad_cap;
    int rc = run_job(&j, threads, err);
    *nbad = j.nbad;
    return rc;
}

/* ---------- lifecycle ---------- */

int hb_repo_open(const char *root, const uint8_t writer_id[16], uint32_t chunk_size, uint64_t pack_target,
                 int zstd_level, hb_repo **out, hb_error *err)
{
    pthread_once(&md_once, md_init);
    if (!sha256_md) return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    if (chunk_size < 4096 || chunk_size > (16u << 20) || (chunk_size & (chunk_size - 1)) ||
        pack_target < PACK_HEADER_LEN + RECORD_HEADER_LEN + (uint64_t)chunk_size)
        return fail(err, HB_EARG, EINVAL, 0, NULL);
    hb_repo *r = calloc(1, sizeof *r);
    if (!r || !(r->root = strdup(root))) {
        free(r);
        return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    }
    memcpy(r->writer_id, writer_id, 16);
    r->chunk_size = chunk_size;
    r->pack_target = pack_target;
    r->level = zstd_level;
    for (int i = 0; i < MAX_WRITERS; i++) {
        r->writers[i].fd = -1;
        pthread_mutex_init(&r->writers[i].lock, NULL);
    }
    pthread_mutex_init(&r->ix_lock, NULL);
    pthread_mutex_init(&r->solo_lock, NULL);
    *out = r;
    return HB_OK;
}

void hb_repo_close(hb_repo *r)
{
    if (!r) return;
    for (int i = 0; i < MAX_WRITERS; i++) {
        writer_t *wr = &r->writers[i];
        if (wr->fd >= 0) {
            /* an unflushed pack was never indexed: nothing refers to it */
            char path[PATH_MAX];
            pack_path(r, &r->packs[wr->pack], path, sizeof path);
            close(wr->fd);
            unlink(path);
        }
        free(wr->buf);
        free(wr->entries);
        pthread_mutex_destroy(&wr->lock);
    }
    if (r->solo) {
        worker_free(r->solo);
        free(r->solo);
    }
    EVP_MAC_CTX_free(r->id_mac);
    OPENSSL_cleanse(r->aead_key, sizeof r->aead_key);
    pthread_mutex_destroy(&r->ix_lock);
    pthread_mutex_destroy(&r->solo_lock);
    free(r->slots);
    free(r->packs);
    free(r->root);
    free(r);
}

int hb_repo_set_keys(hb_repo *r, const uint8_t aead_key[HB_KEY_LEN], const uint8_t id_key[HB_KEY_LEN],
                     hb_error *err)
{
    pthread_once(&md_once, md_init);
    /* a worker made before the keys would hash and write in clear */
    if (r->encrypted || r->solo || r->npacks) return fail(err, HB_EARG, EINVAL, 0, NULL);
    if (!hmac_alg || !gcm_cipher) return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, (char *)"SHA256", 0),
        OSSL_PARAM_construct_end(),
    };
    r->id_mac = EVP_MAC_CTX_new(hmac_alg);
    if (!r->id_mac || !EVP_MAC_init(r->id_mac, id_key, HB_KEY_LEN, params)) {
        EVP_MAC_CTX_free(r->id_mac);
        r->id_mac = NULL;
        return fail(err, HB_ENOMEM, ENOMEM, 0, NULL);
    }
    memcpy(r->aead_key, aead_key, HB_KEY_LEN);
    r->encrypted = 1;
    return HB_OK;
}
