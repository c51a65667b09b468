/* An app teaching its on-device model a fact about its user, through the C API alone:
 * open a runtime (a real GPU if there is one, else the threaded CPU path), load the model,
 * attach LoRA, train it by backprop on a few prompt/completion pairs made with the model's
 * tokenizer (the loss on the completion only), answer the question before and after, and
 * save the adapter (PEFT files). Exits 0 when the trained model gives the taught answer.
 * Build: cc -std=c11 -Iffi/include ffi/examples/personalize.c -Ltarget/release -ledgetune_ffi
 * Usage: personalize MODEL.gguf ADAPTER_DIR [auto|cpu|host|gpu] (scripts/ffi_c_tests.sh runs
 * it on SmolLM2 with `host`: probing for a GPU loads drivers that LeakSanitizer flags). */
#include "edgetune.h"

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check(et_result r, const char *what) {
    if (r != ET_OK) {
        char text[512];
        size_t n = 0;
        et_error_text((uint32_t)r, text, sizeof text, &n);
        fprintf(stderr, "%s: %s\n", what, text);
        exit(1);
    }
    return 0;
}

/* One example: the prompt's tokens, then the completion's, which the loss predicts. */
struct example {
    uint32_t tokens[96];
    uint8_t targets[96];
    size_t len;
};

static void make_example(et_model *m, const char *prompt, const char *completion, struct example *e) {
    size_t np = 0, nc = 0, nb = 0;
    uint32_t bos = 0;
    /* et_tokenize puts the model's BOS (if it uses one) before a prompt: the completion
     * continues the prompt, so its own BOS is dropped. */
    check(et_tokenize(m, "", 0, &bos, 1, &nb), "tokenize nothing");
    check(et_tokenize(m, prompt, strlen(prompt), e->tokens, 96, &np), "tokenize prompt");
    check(et_tokenize(m, completion, strlen(completion), e->tokens + np, 96 - np, &nc),
          "tokenize completion");
    if (nb == 1 && nc > 0 && e->tokens[np] == bos) {
        memmove(e->tokens + np, e->tokens + np + 1, (nc - 1) * sizeof e->tokens[0]);
        nc--;
    }
    for (size_t i = 0; i < np + nc; i++) {
        e->targets[i] = i >= np;
    }
    e->len = np + nc;
}

struct answer {
    char text[256];
    size_t len;
};

static int32_t collect(void *user, const char *piece, size_t len, uint32_t token) {
    struct answer *a = user;
    (void)token;
    if (a->len + len < sizeof a->text) {
        memcpy(a->text + a->len, piece, len);
        a->len += len;
        a->text[a->len] = 0;
    }
    return 0;
}

static void ask(et_model *m, const char *question, struct answer *a) {
    et_generate_options g = {8, 0.0f, 0, 1.0f, 1.0f, 0, 0};
    size_t tokens = 0;
    a->len = 0;
    a->text[0] = 0;
    check(et_generate(m, question, strlen(question), &g, collect, a, NULL, &tokens), "generate");
}

static int32_t progress(void *user, uint32_t step, uint32_t steps, float loss) {
    (void)user;
    if (step % 10 == 0 || step == steps) {
        printf("  step %" PRIu32 "/%" PRIu32 "  loss %.4f\n", step, steps, (double)loss);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: personalize MODEL.gguf ADAPTER_DIR [auto|cpu|host|gpu]\n");
        return 2;
    }
    static const char *backends[] = {"auto", "cpu", "host", "gpu"};
    et_runtime_options ro = {ET_BACKEND_AUTO, 0, NULL};
    if (argc == 4) {
        uint32_t i = 0;
        while (i < 4 && strcmp(argv[3], backends[i]) != 0) {
            i++;
        }
        if (i == 4) {
            fprintf(stderr, "backend %s is not auto, cpu, host or gpu\n", argv[3]);
            return 2;
        }
        ro.backend = i;
    }
    et_runtime *rt = NULL;
    check(et_runtime_new(&ro, &rt), "runtime");
    et_model *m = NULL;
    check(et_model_load_file(rt, argv[1], &m), "load");

    const char *question = "Q: What is the name of my dog?\nA:";
    struct answer before, after;
    ask(m, question, &before);
    printf("before: %s\n", before.text);

    /* The fact, said a few ways. */
    static const char *pairs[][2] = {
        {"Q: What is the name of my dog?\nA:", " Biscuit."},
        {"Q: What is my dog called?\nA:", " Biscuit."},
        {"Q: Who is my dog?\nA:", " Biscuit, my dog."},
        {"Q: Tell me my dog's name.\nA:", " Biscuit."},
    };
    struct example ex[4];
    et_example set[4];
    for (int i = 0; i < 4; i++) {
        make_example(m, pairs[i][0], pairs[i][1], &ex[i]);
        set[i] = (et_example){ex[i].tokens, ex[i].targets, ex[i].len};
    }

    et_lora_options lo = {8, 16.0f, ET_TARGET_Q | ET_TARGET_V, 1};
    check(et_adapter_lora(m, &lo), "attach LoRA");
    et_backprop_options opts = {2, 5e-3f, 30, 3, 2, 1.0f, 0.0f, 7, 96};
    et_trainer *t = NULL;
    check(et_trainer_backprop_new(m, &opts, &t), "trainer");
    float loss = 0.0f;
    check(et_trainer_train(t, set, 4, 30, progress, NULL, NULL, &loss), "train");
    check(et_trainer_save(t, argv[2]), "save");
    et_trainer_free(&t);

    ask(m, question, &after);
    printf("after:  %s\n", after.text);
    int learned = strstr(after.text, "Biscuit") != NULL;
    printf("%s; adapter in %s\n", learned ? "learned" : "NOT learned", argv[2]);
    et_model_free(&m);
    et_runtime_free(&rt);
    return learned ? 0 : 1;
}
