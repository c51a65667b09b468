/* The C API as an app uses it, and as a careless app misuses it: every call checked for its
 * result code. Usage: flow TINY_MODEL_DIR [SMOLLM2.gguf]
 * The tiny model (no tokenizer) covers runtimes, logits, handles, bad input, and training
 * sessions (backprop and zeroth-order on LoRA, block scales and norms: steps, eval, save,
 * resume, state hashes); SmolLM2
 * (a GGUF with its tokenizer) covers loading from memory, tokenizing, detokenizing and
 * generating with a callback and a cancel flag. Built with -std=c11 -Wall -Wextra
 * -Werror -pedantic; run under AddressSanitizer + UndefinedBehaviorSanitizer and valgrind
 * by scripts/ffi_c_tests.sh. */
#include "edgetune.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
/* The tiny model's path (argv[1]). */
static const char *TINY;

static void expect(int line, et_result got, et_result want, const char *what) {
    if (got != want) {
        char text[512];
        size_t n = 0;
        et_error_text((uint32_t)got, text, sizeof text, &n);
        fprintf(stderr, "flow.c:%d: %s: got %d (%s), want %d\n", line, what, (int)got, text, (int)want);
        failures++;
    }
}
#define EXPECT(call, want) expect(__LINE__, (call), (want), #call)
#define OK(call) EXPECT(call, ET_OK)

struct text {
    char buf[4096];
    size_t len;
    int calls;
};

static int32_t collect(void *user, const char *piece, size_t len, uint32_t token) {
    struct text *t = user;
    (void)token;
    if (t->len + len < sizeof t->buf) {
        memcpy(t->buf + t->len, piece, len);
        t->len += len;
    }
    t->calls++;
    return 0;
}

static int32_t refuse(void *user, const char *piece, size_t len, uint32_t token) {
    (void)user, (void)piece, (void)len, (void)token;
    return 7;
}

static int32_t cancel_after_first(void *user, const char *piece, size_t len, uint32_t token) {
    (void)piece, (void)len, (void)token;
    atomic_store_explicit((_Atomic uint8_t *)user, 1, memory_order_relaxed);
    return 0;
}

/* An output the call must leave alone when it fails. */
static void untouched(int line, size_t v) {
    if (v != SIZE_MAX) {
        fprintf(stderr, "flow.c:%d: an output was written on failure\n", line);
        failures++;
    }
}
#define UNTOUCHED(v) untouched(__LINE__, (v))

struct progress {
    int calls;
    float first;
    float last;
};

static int32_t on_progress(void *user, uint32_t step, uint32_t steps, float loss) {
    struct progress *p = user;
    (void)step, (void)steps;
    if (p->calls == 0) {
        p->first = loss;
    }
    p->last = loss;
    p->calls++;
    return 0;
}

static int32_t stop_training(void *user, uint32_t step, uint32_t steps, float loss) {
    (void)user, (void)step, (void)steps, (void)loss;
    return 3;
}

/* Logits of `toks` on `model` into a new buffer of `*n` floats. */
static float *logits_of(et_model *model, const uint32_t *toks, size_t len, size_t *n) {
    OK(et_logits(model, toks, len, NULL, 0, n));
    float *out = calloc(*n, sizeof *out);
    size_t got = 0;
    OK(et_logits(model, toks, len, out, *n, &got));
    return out;
}

static void same(int line, const float *a, const float *b, size_t n, const char *what) {
    if (memcmp(a, b, n * sizeof *a) != 0) {
        fprintf(stderr, "flow.c:%d: %s differ\n", line, what);
        failures++;
    }
}
#define SAME(a, b, n, what) same(__LINE__, (a), (b), (n), (what))

static const uint32_t toks[6] = {1, 5, 9, 13, 17, 21};
static const uint8_t flags[6] = {0, 1, 1, 1, 1, 1};
/* Five examples taken two at a time: each step's batch depends on where the session's
 * order stands, so a resume that restarted the order would show. */
static const uint32_t seqs[5][6] = {
    {1, 5, 9, 13, 17, 21}, {1, 7, 3, 30, 2, 8}, {1, 40, 41, 42, 43, 44}, {1, 2, 3, 4, 5, 6}, {1, 60, 50, 40, 30, 20}};
static et_example five[5];

static void make_five(void) {
    for (int i = 0; i < 5; i++) {
        five[i] = (et_example){seqs[i], flags, (size_t)(4 + i % 3)};
    }
}

/* A fresh tiny model on its own CPU runtime, with `lo`'s LoRA attached. */
static et_model *fresh_lora(const et_lora_options *lo) {
    et_runtime *rt = NULL;
    et_runtime_options opts = {ET_BACKEND_CPU, 0, NULL};
    OK(et_runtime_new(&opts, &rt));
    et_model *m = NULL;
    OK(et_model_load_file(rt, TINY, &m));
    et_runtime_free(&rt);
    OK(et_adapter_lora(m, lo));
    return m;
}

/* Zeroth-order steps (FedKSeed seeds) keep their state between calls; a session saved and
 * resumed on another model replays to the same state hash and the same logits. */
static void zeroth_order(void) {
    et_lora_options lo = {4, 8.0f, ET_TARGET_Q | ET_TARGET_V, 3};
    et_model *a = fresh_lora(&lo);
    et_zo_options zo = {2, 1e-2f, 1e-2f, 64, 0, 0.0f, 11, 8};
    et_trainer *t = NULL;
    EXPECT(et_trainer_zo_new(a, NULL, &t), ET_NULL_POINTER);
    EXPECT(et_trainer_zo_new(a, &zo, NULL), ET_NULL_POINTER);
    et_zo_options bad = zo;
    bad.eps = 0.0f;
    EXPECT(et_trainer_zo_new(a, &bad, &t), ET_INVALID_ARGUMENT);
    bad = zo;
    bad.batch = 100000;
    EXPECT(et_trainer_zo_new(a, &bad, &t), ET_INVALID_ARGUMENT);
    OK(et_trainer_zo_new(a, &zo, &t));
    /* The model's adapter cannot change under a trainer, nor a second trainer share it. */
    EXPECT(et_adapter_lora(a, &lo), ET_BUSY);
    et_trainer *second = NULL;
    EXPECT(et_trainer_zo_new(a, &zo, &second), ET_BUSY);
    float before = 0.0f, loss = 0.0f, after = 0.0f;
    EXPECT(et_trainer_eval(t, five, 5, NULL), ET_NULL_POINTER);
    EXPECT(et_trainer_eval(t, NULL, 5, &before), ET_NULL_POINTER);
    OK(et_trainer_eval(t, five, 5, &before));
    OK(et_trainer_train(t, five, 5, 10, NULL, NULL, NULL, &loss));
    OK(et_trainer_train(t, five, 5, 10, NULL, NULL, NULL, &loss));
    OK(et_trainer_eval(t, five, 5, &after));
    uint8_t hash[32], again[32];
    EXPECT(et_trainer_state_hash(t, NULL), ET_NULL_POINTER);
    EXPECT(et_trainer_state_hash(NULL, hash), ET_NULL_POINTER);
    OK(et_trainer_state_hash(t, hash));
    if (!(after != before)) {
        fprintf(stderr, "zeroth-order: eval %f -> %f\n", (double)before, (double)after);
        failures++;
    }
    EXPECT(et_trainer_save(t, NULL), ET_NULL_POINTER);
    OK(et_trainer_save(t, "target/ffi-tests/zo-run"));
    size_t n = 0;
    float *trained = logits_of(a, toks, 6, &n);

    /* 20 steps in one call reach the state of 10 + 10. */
    et_model *straight = fresh_lora(&lo);
    et_trainer *s20 = NULL;
    OK(et_trainer_zo_new(straight, &zo, &s20));
    OK(et_trainer_train(s20, five, 5, 20, NULL, NULL, NULL, &loss));
    OK(et_trainer_state_hash(s20, again));
    if (memcmp(hash, again, sizeof hash) != 0) {
        fprintf(stderr, "zeroth-order: 10 + 10 steps differ from 20\n");
        failures++;
    }
    et_trainer_free(&s20);
    et_model_free(&straight);

    et_model *b = fresh_lora(&lo);
    et_trainer *u = NULL;
    OK(et_trainer_zo_new(b, &zo, &u));
    EXPECT(et_trainer_resume(u, NULL), ET_NULL_POINTER);
    EXPECT(et_trainer_resume(u, "target/ffi-tests/no-such-run"), ET_IO);
    OK(et_trainer_resume(u, "target/ffi-tests/zo-run"));
    OK(et_trainer_state_hash(u, again));
    if (memcmp(hash, again, sizeof hash) != 0) {
        fprintf(stderr, "zeroth-order: the resumed state hash differs\n");
        failures++;
    }
    float *resumed = logits_of(b, toks, 6, &n);
    SAME(trained, resumed, n, "logits of a resumed zeroth-order session");
    /* Continuing both gives the same state again. */
    OK(et_trainer_train(t, five, 5, 3, NULL, NULL, NULL, &loss));
    OK(et_trainer_train(u, five, 5, 3, NULL, NULL, NULL, &loss));
    OK(et_trainer_state_hash(t, hash));
    OK(et_trainer_state_hash(u, again));
    if (memcmp(hash, again, sizeof hash) != 0) {
        fprintf(stderr, "zeroth-order: the sessions parted after resuming\n");
        failures++;
    }
    /* A trainer with other options does not continue a saved session, nor write over
     * another session's directory (another session key). */
    et_trainer_free(&u);
    et_zo_options other = zo;
    other.batch = 3;
    other.seed = 12;
    OK(et_trainer_zo_new(b, &other, &u));
    EXPECT(et_trainer_resume(u, "target/ffi-tests/zo-run"), ET_INVALID_ARGUMENT);
    OK(et_trainer_train(u, five, 5, 1, NULL, NULL, NULL, &loss));
    EXPECT(et_trainer_save(u, "target/ffi-tests/zo-run"), ET_INVALID_ARGUMENT);
    free(trained);
    free(resumed);
    et_trainer_free(&u);
    et_trainer_free(&t);
    et_trainer_free(&t);
    /* Freed trainers release the model (it refuses a second adapter, not a busy one). */
    EXPECT(et_adapter_lora(a, &lo), ET_INVALID_ARGUMENT);
    et_model_free(&b);
    et_model_free(&a);
}

/* The last failure's text names backprop's refusal (not some other bad option). */
static void refused_by_backprop(int line) {
    char text[512];
    size_t n = 0;
    OK(et_error_text(ET_INVALID_ARGUMENT, text, sizeof text, &n));
    if (strstr(text, "backprop trains lora or ia3") == NULL) {
        fprintf(stderr, "flow.c:%d: refused for another reason: %s\n", line, text);
        failures++;
    }
}

/* QZO through the C API: the tiny Q4_0 model's block scales train by zeroth-order steps
 * (backprop refuses them), and saved and reloaded they give the same logits; norm weights
 * train too. */
static void scales_and_norms(void) {
    et_runtime *rt = NULL;
    et_runtime_options opts = {ET_BACKEND_CPU, 0, NULL};
    OK(et_runtime_new(&opts, &rt));
    et_model *m = NULL;
    OK(et_model_load_file(rt, TINY, &m));
    EXPECT(et_adapter_scales(m, 1u << 7), ET_INVALID_ARGUMENT);
    EXPECT(et_adapter_scales(NULL, 0), ET_NULL_POINTER);
    OK(et_adapter_scales(m, 0));
    et_trainer *t = NULL;
    et_backprop_options bo = {2, 1e-2f, 4, 0, 0, 0.0f, 0.0f, 0, 8};
    EXPECT(et_trainer_backprop_new(m, &bo, &t), ET_INVALID_ARGUMENT);
    refused_by_backprop(__LINE__);
    et_zo_options zo = {2, 5e-2f, 1e-2f, 64, 0, 0.0f, 21, 8};
    OK(et_trainer_zo_new(m, &zo, &t));
    float before = 0.0f, after = 0.0f, loss = 0.0f;
    OK(et_trainer_eval(t, five, 5, &before));
    OK(et_trainer_train(t, five, 5, 20, NULL, NULL, NULL, &loss));
    OK(et_trainer_eval(t, five, 5, &after));
    if (!(after != before)) {
        fprintf(stderr, "scales: eval %f -> %f\n", (double)before, (double)after);
        failures++;
    }
    et_trainer_free(&t);
    OK(et_adapter_save(m, "target/ffi-tests/scales"));
    size_t n = 0;
    float *trained = logits_of(m, toks, 6, &n);
    et_model *again = NULL;
    OK(et_model_load_file(rt, TINY, &again));
    OK(et_adapter_load(again, "target/ffi-tests/scales"));
    float *loaded = logits_of(again, toks, 6, &n);
    SAME(trained, loaded, n, "logits of saved and reloaded block scales");
    free(trained);
    free(loaded);
    et_model_free(&again);
    et_model_free(&m);

    OK(et_model_load_file(rt, TINY, &m));
    OK(et_adapter_norms(m));
    EXPECT(et_trainer_backprop_new(m, &bo, &t), ET_INVALID_ARGUMENT);
    refused_by_backprop(__LINE__);
    OK(et_trainer_zo_new(m, &zo, &t));
    OK(et_trainer_eval(t, five, 5, &before));
    OK(et_trainer_train(t, five, 5, 20, NULL, NULL, NULL, &loss));
    OK(et_trainer_eval(t, five, 5, &after));
    if (!(after != before)) {
        fprintf(stderr, "norms: eval %f -> %f\n", (double)before, (double)after);
        failures++;
    }
    et_trainer_free(&t);
    et_model_free(&m);

    /* An unquantised model has no block scales to train. */
    OK(et_model_load_file(rt, "tests/golden/tiny/llama_gqa_tied/f32.gguf", &m));
    EXPECT(et_adapter_scales(m, 0), ET_INVALID_ARGUMENT);
    et_model_free(&m);
    et_runtime_free(&rt);
}

/* LoRA trained by backprop on the tiny model, resumed bit-exactly from a checkpoint, saved,
 * and loaded into a fresh model that then gives the same logits. */
static void training(et_model *model) {
    et_lora_options lo = {4, 8.0f, ET_TARGET_Q | ET_TARGET_V, 1};
    et_backprop_options to = {2, 5e-2f, 16, 0, 0, 1.0f, 0.0f, 0, 8};
    et_trainer *t = NULL;
    EXPECT(et_adapter_lora(model, NULL), ET_NULL_POINTER);
    EXPECT(et_adapter_save(model, "target/ffi-tests/adapter"), ET_INVALID_ARGUMENT);
    EXPECT(et_trainer_backprop_new(model, &to, &t), ET_INVALID_ARGUMENT);
    OK(et_adapter_lora(model, &lo));
    EXPECT(et_adapter_lora(model, &lo), ET_INVALID_ARGUMENT);
    et_example ex[2] = {{toks, flags, 6}, {toks, flags, 4}};
    et_backprop_options bad = to;
    bad.schedule = 9;
    EXPECT(et_trainer_backprop_new(model, &bad, &t), ET_INVALID_ARGUMENT);
    bad = to;
    bad.lr = -1.0f;
    EXPECT(et_trainer_backprop_new(model, &bad, &t), ET_INVALID_ARGUMENT);
    if (t != NULL) {
        fprintf(stderr, "a trainer was written on failure\n");
        failures++;
    }
    EXPECT(et_trainer_backprop_new((const et_model *)&to, &to, &t), ET_WRONG_HANDLE);
    OK(et_trainer_backprop_new(model, &to, &t));
    struct progress p = {0, 0.0f, 0.0f};
    float loss = -1.0f;
    OK(et_trainer_train(t, five, 5, 4, on_progress, &p, NULL, &loss));
    OK(et_trainer_save(t, "target/ffi-tests/backprop-run"));
    OK(et_trainer_train(t, five, 5, 4, on_progress, &p, NULL, &loss));
    if (p.calls != 8 || !(p.last < p.first)) {
        fprintf(stderr, "training: %d steps, loss %f -> %f (returned %f)\n", p.calls, (double)p.first,
                (double)p.last, (double)loss);
        failures++;
    }
    float kept = loss;
    EXPECT(et_trainer_train(t, ex, 2, 4, stop_training, NULL, NULL, &loss), ET_CALLBACK);
    if (loss != kept) {
        fprintf(stderr, "an output was written on failure\n");
        failures++;
    }
    EXPECT(et_trainer_train(t, ex, 2, 1, NULL, NULL, NULL, NULL), ET_NULL_POINTER);
    et_example short_ex = {toks, flags, 1};
    EXPECT(et_trainer_train(t, &short_ex, 1, 1, NULL, NULL, NULL, &loss), ET_INVALID_ARGUMENT);
    static const uint32_t nine[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    static const uint8_t nine_flags[9] = {0, 1, 1, 1, 1, 1, 1, 1, 1};
    et_example long_ex = {nine, nine_flags, 9};
    EXPECT(et_trainer_train(t, &long_ex, 1, 1, NULL, NULL, NULL, &loss), ET_INVALID_ARGUMENT);
    et_example null_ex = {NULL, flags, 6};
    EXPECT(et_trainer_train(t, &null_ex, 1, 1, NULL, NULL, NULL, &loss), ET_NULL_POINTER);
    const uint32_t far[2] = {1, 4000000000u};
    et_example bad_ids = {far, flags, 2};
    EXPECT(et_trainer_train(t, &bad_ids, 1, 1, NULL, NULL, NULL, &loss), ET_INVALID_ARGUMENT);
    uint8_t hash[32];
    EXPECT(et_trainer_state_hash(t, hash), ET_INVALID_ARGUMENT);

    /* A new session resumed from the checkpoint after step 4 retraces steps 5-8 bit for
     * bit: its values equal those of 8 steps run straight through on a third model. */
    et_model *other = fresh_lora(&lo);
    et_trainer *u = NULL;
    OK(et_trainer_backprop_new(other, &to, &u));
    OK(et_trainer_resume(u, "target/ffi-tests/backprop-run"));
    OK(et_trainer_train(u, five, 5, 4, NULL, NULL, NULL, &loss));
    et_trainer_free(&u);
    size_t n = 0;
    float *resumed = logits_of(other, toks, 6, &n);
    et_model_free(&other);
    et_trainer_free(&t);

    /* Replaying the first 8 steps on a third model from scratch gives the same values. */
    et_model *third = fresh_lora(&lo);
    OK(et_trainer_backprop_new(third, &to, &u));
    OK(et_trainer_train(u, five, 5, 8, NULL, NULL, NULL, &loss));
    et_trainer_free(&u);
    float *straight = logits_of(third, toks, 6, &n);
    SAME(straight, resumed, n, "logits of a resumed backprop session");
    free(straight);
    free(resumed);
    et_model_free(&third);

    OK(et_adapter_save(model, "target/ffi-tests/adapter"));
    size_t need = 0;
    float *trained = logits_of(model, toks, 6, &need);
    float *loaded = calloc(need, sizeof *loaded);
    size_t got = 0;
    et_runtime *rt = NULL;
    et_runtime_options opts = {ET_BACKEND_CPU, 0, NULL};
    OK(et_runtime_new(&opts, &rt));
    et_model *fresh = NULL;
    OK(et_model_load_file(rt, TINY, &fresh));
    EXPECT(et_adapter_load(fresh, "target/ffi-tests/no-such-adapter"), ET_IO);
    OK(et_adapter_load(fresh, "target/ffi-tests/adapter"));
    OK(et_logits(fresh, toks, 6, loaded, need, &got));
    if (memcmp(trained, loaded, need * sizeof *trained) != 0) {
        fprintf(stderr, "the saved adapter gives other logits\n");
        failures++;
    }
    free(trained);
    free(loaded);
    et_model_free(&fresh);
    et_runtime_free(&rt);
}

static void versions(void) {
    if (strcmp(et_version(), ET_VERSION) != 0) {
        fprintf(stderr, "et_version() %s != ET_VERSION %s\n", et_version(), ET_VERSION);
        failures++;
    }
    char text[64];
    size_t n = 0;
    OK(et_error_text(ET_NULL_POINTER, text, sizeof text, &n));
    if (n == 0 || strlen(text) != n) {
        fprintf(stderr, "et_error_text wrote %zu bytes: %s\n", n, text);
        failures++;
    }
    /* A short buffer is cut, still NUL-terminated; a query writes the full length. */
    char small[8];
    OK(et_error_text(ET_NULL_POINTER, small, sizeof small, &n));
    if (n != 7 || small[7] != 0) {
        fprintf(stderr, "short buffer: %zu\n", n);
        failures++;
    }
    size_t full = 0;
    OK(et_error_text(ET_NULL_POINTER, NULL, 0, &full));
    if (full != strlen(text)) {
        fprintf(stderr, "query says %zu, text is %zu\n", full, strlen(text));
        failures++;
    }
    EXPECT(et_error_text(9999, text, sizeof text, &n), ET_INVALID_ARGUMENT);
    EXPECT(et_error_text(ET_OK, text, sizeof text, NULL), ET_NULL_POINTER);
}

static void tiny(const char *dir) {
    et_runtime *rt = NULL;
    et_runtime_options opts = {ET_BACKEND_CPU, 0, NULL};
    OK(et_runtime_new(&opts, &rt));
    et_runtime_options bad = {99, 0, NULL};
    et_runtime *none = NULL;
    EXPECT(et_runtime_new(&bad, &none), ET_INVALID_ARGUMENT);
    EXPECT(et_runtime_new(NULL, NULL), ET_NULL_POINTER);
    if (none != NULL) {
        fprintf(stderr, "an output was written on failure\n");
        failures++;
    }

    et_model *model = NULL;
    /* NULL in every pointer slot, a missing file, invalid UTF-8, a corrupt file. */
    EXPECT(et_model_load_file(NULL, dir, &model), ET_NULL_POINTER);
    EXPECT(et_model_load_file(rt, NULL, &model), ET_NULL_POINTER);
    EXPECT(et_model_load_file(rt, dir, NULL), ET_NULL_POINTER);
    EXPECT(et_model_load_file(rt, "/nonexistent/model.gguf", &model), ET_IO);
    EXPECT(et_model_load_file(rt, "\xff\xfe", &model), ET_INVALID_UTF8);
    static const uint8_t junk[64] = {'G', 'G', 'U', 'F', 3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff};
    EXPECT(et_model_load_bytes(rt, junk, sizeof junk, &model), ET_BAD_FILE);
    EXPECT(et_model_load_bytes(rt, NULL, 10, &model), ET_NULL_POINTER);
    if (model != NULL) {
        fprintf(stderr, "a model was written on failure\n");
        failures++;
    }
    OK(et_model_load_file(rt, dir, &model));

    /* A handle of the wrong kind is refused by its tag. */
    uint32_t vocab = 0;
    EXPECT(et_vocab_size((const et_model *)rt, &vocab), ET_WRONG_HANDLE);
    EXPECT(et_vocab_size(model, NULL), ET_NULL_POINTER);
    OK(et_vocab_size(model, &vocab));

    /* Logits: a size query, too small a buffer, then the values. */
    const uint32_t ids[3] = {1, 2, 3};
    size_t need = SIZE_MAX;
    EXPECT(et_logits(model, ids, 0, NULL, 0, &need), ET_INVALID_ARGUMENT);
    UNTOUCHED(need);
    OK(et_logits(model, ids, 3, NULL, 0, &need));
    if (need != 3 * (size_t)vocab) {
        fprintf(stderr, "logits need %zu, want %u\n", need, 3 * vocab);
        failures++;
    }
    float *logits = calloc(need, sizeof *logits);
    size_t got = SIZE_MAX;
    EXPECT(et_logits(model, ids, 3, logits, need - 1, &got), ET_BUFFER_TOO_SMALL);
    UNTOUCHED(got);
    OK(et_logits(model, ids, 3, logits, need, &got));
    float spread = 0.0f;
    for (size_t i = 1; i < need; i++) {
        float d = logits[i] - logits[0];
        spread += d < 0 ? -d : d;
    }
    if (got != need || spread == 0.0f) {
        fprintf(stderr, "logits: %zu values, spread %f\n", got, (double)spread);
        failures++;
    }
    const uint32_t bad_ids[1] = {4000000000u};
    EXPECT(et_logits(model, bad_ids, 1, logits, need, &got), ET_INVALID_ARGUMENT);

    /* No tokenizer in the tiny model: a typed error. */
    size_t n = SIZE_MAX;
    EXPECT(et_tokenize(model, "hi", 2, NULL, 0, &n), ET_INVALID_ARGUMENT);
    UNTOUCHED(n);

    /* The runtime may go first: the model shares its backend and still runs, with the
     * same logits. Double frees are no-ops. */
    et_runtime_free(&rt);
    et_runtime_free(&rt);
    float *again = calloc(need, sizeof *again);
    OK(et_logits(model, ids, 3, again, need, &got));
    if (memcmp(again, logits, need * sizeof *logits) != 0) {
        fprintf(stderr, "logits changed after the runtime was freed\n");
        failures++;
    }
    free(again);
    free(logits);
    training(model);
    zeroth_order();
    scales_and_norms();
    et_model_free(&model);
    et_model_free(&model);
    et_model_free(NULL);
    EXPECT(et_vocab_size(model, &vocab), ET_NULL_POINTER);

    /* The conformance suite as JSON (one kernel family is enough here: the full suite
     * runs in `edgetune selftest`). */
    OK(et_runtime_new(&opts, &rt));
    const char *json = NULL;
    EXPECT(et_selftest_json(rt, "axpy", NULL), ET_NULL_POINTER);
    OK(et_selftest_json(rt, "axpy", &json));
    if (json == NULL || strstr(json, "\"rows\"") == NULL) {
        fprintf(stderr, "selftest JSON: %.80s\n", json ? json : "(null)");
        failures++;
    }
    et_string_free(&json);
    et_string_free(&json);
    et_runtime_free(&rt);
}

static void smollm2(const char *path) {
    et_runtime *rt = NULL;
    et_runtime_options opts = {ET_BACKEND_HOST, 2, NULL};
    OK(et_runtime_new(&opts, &rt));
    /* From memory: the app read the file itself. */
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "cannot open %s\n", path);
        failures++;
        return;
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *bytes = malloc((size_t)size);
    if (fread(bytes, 1, (size_t)size, f) != (size_t)size) {
        failures++;
    }
    fclose(f);
    et_model *model = NULL;
    OK(et_model_load_bytes(rt, bytes, (size_t)size, &model));
    free(bytes);

    const char *prompt = "The capital of France is";
    size_t n = SIZE_MAX;
    OK(et_tokenize(model, prompt, strlen(prompt), NULL, 0, &n));
    uint32_t ids[64];
    size_t bad = SIZE_MAX;
    EXPECT(et_tokenize(model, prompt, strlen(prompt), ids, 1, &bad), ET_BUFFER_TOO_SMALL);
    EXPECT(et_tokenize(model, "\xc3\x28", 2, ids, 64, &bad), ET_INVALID_UTF8);
    UNTOUCHED(bad);
    OK(et_tokenize(model, prompt, strlen(prompt), ids, 64, &n));
    char text[256];
    size_t len = 0;
    OK(et_detokenize(model, ids, n, text, sizeof text, &len));
    if (strstr(text, prompt) == NULL) {
        fprintf(stderr, "detokenized: %s\n", text);
        failures++;
    }
    EXPECT(et_detokenize(model, ids, n, text, 3, &bad), ET_BUFFER_TOO_SMALL);
    UNTOUCHED(bad);

    et_generate_options g = {6, 0.0f, 0, 1.0f, 1.0f, 0, 0};
    struct text out = {{0}, 0, 0};
    size_t tokens = 0;
    OK(et_generate(model, prompt, strlen(prompt), &g, collect, &out, NULL, &tokens));
    if (tokens == 0 || out.len == 0 || out.calls == 0) {
        fprintf(stderr, "generated %zu tokens, %zu bytes\n", tokens, out.len);
        failures++;
    } else {
        printf("generated:%.*s\n", (int)out.len, out.buf);
    }
    EXPECT(et_generate(model, prompt, strlen(prompt), &g, refuse, NULL, NULL, &bad), ET_CALLBACK);
    static _Atomic uint8_t cancel;
    atomic_store(&cancel, 0);
    EXPECT(et_generate(model, prompt, strlen(prompt), &g, cancel_after_first, (void *)&cancel,
                       (const uint8_t *)&cancel, &bad),
           ET_CANCELLED);
    /* Set before the call: nothing runs. */
    EXPECT(et_generate(model, prompt, strlen(prompt), &g, collect, &out, (const uint8_t *)&cancel, &bad),
           ET_CANCELLED);
    UNTOUCHED(bad);
    char detail[256];
    OK(et_error_text(ET_CANCELLED, detail, sizeof detail, &len));
    if (strstr(detail, "cancel") == NULL) {
        fprintf(stderr, "detail: %s\n", detail);
        failures++;
    }
    et_model_free(&model);
    et_runtime_free(&rt);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: flow TINY_MODEL_DIR [SMOLLM2.gguf]\n");
        return 2;
    }
    TINY = argv[1];
    versions();
    make_five();
    tiny(argv[1]);
    if (argc > 2) {
        smollm2(argv[2]);
    }
#ifdef ET_PANIC_TEST
    EXPECT(et_debug_panic(), ET_PANIC);
#endif
    if (failures != 0) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
