/* A federated round through the C API against a real edgetune-server, with curl as the
 * app's HTTP stack: fetch the session, join, train the round's local steps, sign and post
 * the upload, fetch the closed round and apply it (its published digest checked), resume
 * from the client's directory, join late from a checkpoint; plus bad messages and NULLs.
 * Usage: fed TINY.gguf BASE_URL KEY_HEX WORK_DIR (scripts/ffi_c_tests.sh starts the
 * server: LoRA r2 alpha 4 on q,v, FedKSeed K=64, quorum 1, client 1 holding KEY_HEX). */
#include "edgetune.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

static void expect(int line, et_result got, et_result want, const char *what) {
    if (got != want) {
        char text[512];
        size_t n = 0;
        et_error_text((uint32_t)got, text, sizeof text, &n);
        fprintf(stderr, "fed.c:%d: %s: got %d (%s), want %d\n", line, what, (int)got, text, (int)want);
        failures++;
    }
}
#define EXPECT(call, want) expect(__LINE__, (call), (want), #call)
#define OK(call) EXPECT(call, ET_OK)

static void check(int line, int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "fed.c:%d: %s\n", line, what);
        failures++;
    }
}
#define CHECK(cond) check(__LINE__, (cond), #cond)

static char cmd[4096];
static char path[1024];

/* The whole file at `p` (NULL if unreadable), its size in `*len`. */
static uint8_t *slurp(const char *p, size_t *len) {
    FILE *f = fopen(p, "rb");
    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(size > 0 ? (size_t)size : 1);
    *len = fread(b, 1, (size_t)size, f);
    fclose(f);
    return b;
}

static int spill(const char *p, const uint8_t *b, size_t len) {
    FILE *f = fopen(p, "wb");
    if (f == NULL) {
        return -1;
    }
    size_t n = fwrite(b, 1, len, f);
    fclose(f);
    return n == len ? 0 : -1;
}

/* GET url + route into WORK/name, retrying while the server answers 404 (a round not yet
 * closed); the body, or NULL. */
static uint8_t *get(const char *base, const char *work, const char *route, const char *name,
                    size_t *len) {
    snprintf(path, sizeof path, "%s/%s", work, name);
    snprintf(cmd, sizeof cmd,
             "curl -sf --retry 20 --retry-delay 1 --retry-all-errors -o '%s' '%s%s'", path, base,
             route);
    if (system(cmd) != 0) {
        fprintf(stderr, "failed: %s\n", cmd);
        failures++;
        return NULL;
    }
    return slurp(path, len);
}

/* POSTs `body` as client 1 with `nonce` and `sig`; curl's exit status (0: HTTP 2xx). */
static int post_upload(const char *base, const char *work, const uint8_t *body, size_t len,
                       uint64_t nonce, const char *sig) {
    snprintf(path, sizeof path, "%s/upload.bin", work);
    if (spill(path, body, len) != 0) {
        return -1;
    }
    snprintf(cmd, sizeof cmd,
             "curl -sf -o /dev/null -X POST --data-binary '@%s' -H 'content-type: "
             "application/octet-stream' -H 'x-edgetune-client: 1' -H 'x-edgetune-nonce: %llu' "
             "-H 'x-edgetune-signature: %s' '%s/v1/upload'",
             path, (unsigned long long)nonce, sig, base);
    return system(cmd);
}

static size_t unhex(const char *hex, uint8_t *out, size_t cap) {
    size_t n = 0;
    while (n < cap && hex[2 * n] && hex[2 * n + 1]) {
        unsigned v = 0;
        if (sscanf(hex + 2 * n, "%2x", &v) != 1) {
            break;
        }
        out[n++] = (uint8_t)v;
    }
    return n;
}

/* The tiny model on a CPU runtime with the session's adapter shape (rank `rank`). */
static et_model *model_with_lora(const char *tiny, uint32_t rank) {
    et_runtime *rt = NULL;
    et_runtime_options opts = {ET_BACKEND_CPU, 0, NULL};
    OK(et_runtime_new(&opts, &rt));
    et_model *m = NULL;
    OK(et_model_load_file(rt, tiny, &m));
    et_runtime_free(&rt);
    et_lora_options lo = {rank, 4.0f, ET_TARGET_Q | ET_TARGET_V, 0};
    OK(et_adapter_lora(m, &lo));
    return m;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: fed TINY.gguf BASE_URL KEY_HEX WORK_DIR\n");
        return 2;
    }
    const char *tiny = argv[1], *base = argv[2], *work = argv[4];
    uint8_t key[64];
    size_t key_len = unhex(argv[3], key, sizeof key);

    size_t session_len = 0;
    uint8_t *session = get(base, work, "/v1/session", "session.bin", &session_len);
    if (session == NULL) {
        return 1;
    }
    et_model *model = model_with_lora(tiny, 2);
    et_fed_client *c = NULL;
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/client", work);

    /* Bad joins: NULLs, a damaged session, another adapter layout. */
    EXPECT(et_fed_client_new(model, NULL, session_len, 1, dir, 16, &c), ET_NULL_POINTER);
    EXPECT(et_fed_client_new(model, session, session_len, 1, NULL, 16, &c), ET_NULL_POINTER);
    EXPECT(et_fed_client_new(model, session, session_len, 1, dir, 16, NULL), ET_NULL_POINTER);
    session[session_len / 2] ^= 0x40;
    EXPECT(et_fed_client_new(model, session, session_len, 1, dir, 16, &c), ET_PROTOCOL);
    session[session_len / 2] ^= 0x40;
    et_model *other = model_with_lora(tiny, 4);
    EXPECT(et_fed_client_new(other, session, session_len, 1, dir, 16, &c), ET_PROTOCOL);
    et_model_free(&other);
    CHECK(c == NULL);

    OK(et_fed_client_new(model, session, session_len, 1, dir, 16, &c));
    /* The model's adapter cannot change under a client, nor a second client share it. */
    et_lora_options lo = {2, 4.0f, ET_TARGET_Q | ET_TARGET_V, 0};
    EXPECT(et_adapter_lora(model, &lo), ET_BUSY);
    et_fed_client *second = NULL;
    EXPECT(et_fed_client_new(model, session, session_len, 2, dir, 16, &second), ET_BUSY);
    EXPECT(et_fed_client_state_hash(c, NULL), ET_NULL_POINTER);
    EXPECT(et_fed_client_rounds(c, NULL, NULL), ET_NULL_POINTER);
    EXPECT(et_fed_client_restore_checkpoint(c, NULL, 10), ET_NULL_POINTER);
    EXPECT(et_fed_client_mark_uploaded(c, 5), ET_PROTOCOL);
    uint8_t start[32];
    OK(et_fed_client_state_hash(c, start));

    /* The round's local steps on this device's examples. */
    uint32_t toks[4][11];
    uint8_t flags[4][11];
    et_example ex[4];
    for (int i = 0; i < 4; i++) {
        toks[i][0] = 1;
        for (int k = 0; k < 10; k++) {
            toks[i][k + 1] = (uint32_t)((i * 7 + 3 * k) % 60 + 2);
        }
        for (int k = 0; k < 11; k++) {
            flags[i][k] = k >= 3;
        }
        ex[i] = (et_example){toks[i], flags[i], 11};
    }
    uint8_t *upload = NULL;
    size_t upload_len = 0;
    uint32_t round = 0;
    float loss = 0.0f;
    EXPECT(et_fed_client_train_round(c, ex, 4, 0, &upload, &upload_len, &round, &loss),
           ET_INVALID_ARGUMENT);
    EXPECT(et_fed_client_train_round(c, ex, 4, 2, NULL, &upload_len, &round, &loss), ET_NULL_POINTER);
    OK(et_fed_client_train_round(c, ex, 4, 2, &upload, &upload_len, &round, &loss));
    CHECK(round == 1 && upload_len > 0 && upload != NULL && loss > 0.0f);
    uint8_t after_local[32];
    OK(et_fed_client_state_hash(c, after_local));
    CHECK(memcmp(start, after_local, 32) == 0);

    /* Signed with the client's key; a wrong key is refused by the server. */
    char sig[65], forged[65];
    EXPECT(et_fed_sign(key, key_len, 1, upload, upload_len, NULL), ET_NULL_POINTER);
    EXPECT(et_fed_sign(key, 0, 1, upload, upload_len, sig), ET_INVALID_ARGUMENT);
    OK(et_fed_sign(key, key_len, 1, upload, upload_len, sig));
    CHECK(strlen(sig) == 64);
    uint8_t wrong[4] = {1, 2, 3, 4};
    OK(et_fed_sign(wrong, sizeof wrong, 1, upload, upload_len, forged));
    CHECK(post_upload(base, work, upload, upload_len, 1, forged) != 0);
    CHECK(post_upload(base, work, upload, upload_len, 1, sig) == 0);
    OK(et_fed_client_mark_uploaded(c, round));
    et_bytes_free(upload, upload_len);
    et_bytes_free(NULL, 0);

    /* The closed round (quorum 1): applied once, its digest checked; damaged or
     * truncated copies are refused with nothing applied. */
    size_t round_len = 0;
    uint8_t *msg = get(base, work, "/v1/rounds/1", "round1.bin", &round_len);
    if (msg == NULL) {
        return 1;
    }
    uint32_t r = 0;
    uint8_t applied = 9;
    msg[round_len - 1] ^= 1;
    EXPECT(et_fed_client_apply_round(c, msg, round_len, &r, &applied), ET_PROTOCOL);
    msg[round_len - 1] ^= 1;
    EXPECT(et_fed_client_apply_round(c, msg, round_len - 5, &r, &applied), ET_PROTOCOL);
    EXPECT(et_fed_client_apply_round(c, NULL, round_len, &r, &applied), ET_NULL_POINTER);
    CHECK(applied == 9);
    OK(et_fed_client_apply_round(c, msg, round_len, &r, &applied));
    CHECK(r == 1 && applied == 1);
    OK(et_fed_client_apply_round(c, msg, round_len, &r, &applied));
    CHECK(r == 1 && applied == 0);
    uint8_t hash[32];
    OK(et_fed_client_state_hash(c, hash));
    CHECK(memcmp(hash, start, 32) != 0);
    uint32_t done = 0, uploaded = 0;
    OK(et_fed_client_rounds(c, &done, &uploaded));
    CHECK(done == 1 && uploaded == 1);
    printf("state-hash after round 1: ");
    for (int i = 0; i < 32; i++) {
        printf("%02x", hash[i]);
    }
    printf("\n");

    /* The app restarts: a client made on the same directory has the same state. */
    et_fed_client_free(&c);
    et_fed_client_free(&c);
    OK(et_fed_client_new(model, session, session_len, 1, dir, 16, &c));
    uint8_t again[32];
    OK(et_fed_client_state_hash(c, again));
    CHECK(memcmp(hash, again, 32) == 0);
    OK(et_fed_client_rounds(c, &done, &uploaded));
    CHECK(done == 1 && uploaded == 1);
    et_fed_client_free(&c);

    /* A late joiner takes the server's checkpoint and reaches the same state. */
    size_t cp_len = 0;
    uint8_t *cp = get(base, work, "/v1/checkpoint", "checkpoint.bin", &cp_len);
    if (cp == NULL) {
        return 1;
    }
    snprintf(dir, sizeof dir, "%s/late", work);
    OK(et_fed_client_new(model, session, session_len, 2, dir, 16, &c));
    EXPECT(et_fed_client_restore_checkpoint(c, cp, cp_len / 2), ET_BAD_FILE);
    OK(et_fed_client_restore_checkpoint(c, cp, cp_len));
    OK(et_fed_client_state_hash(c, again));
    CHECK(memcmp(hash, again, 32) == 0);
    et_fed_client_free(&c);
    /* Freed clients release the model (it refuses a second adapter, not a busy one). */
    EXPECT(et_adapter_lora(model, &lo), ET_INVALID_ARGUMENT);

    free(cp);
    free(msg);
    free(session);
    et_model_free(&model);
    if (failures != 0) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
