// {{NAME}} under QEMU: the evaluation harness `edgestar firmware --run qemu` builds. It reads
// 8-bit RGB images (already resized, {{IN_H}}x{{IN_W}}x3 each) from edgestar_inputs.bin through
// semihosting, feeds each through the same lookup table the example app uses, runs the model
// and prints the int8 outputs, the SysTick ticks per inference (QEMU -icount: a count of
// executed instructions, not a latency) and the arena TFLite Micro used.
#include <stdint.h>
#include <stdio.h>

#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/schema/schema_generated.h"

#include "{{NAME}}_model_data.h"
#include "{{NAME}}_model_info.h"
#include "{{NAME}}_op_resolver.h"

#define SYST_CSR (*(volatile uint32_t*)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t*)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t*)0xE000E018u)

static volatile uint32_t systick_wraps = 0;
extern "C" void SysTick_Handler(void) { systick_wraps = systick_wraps + 1; }

static uint64_t ticks() {  // 24-bit down-counter plus the wraps the interrupt counted
  uint32_t wraps, value;
  do {
    wraps = systick_wraps;
    value = SYST_CVR;
  } while (wraps != systick_wraps);
  return ((uint64_t)wraps << 24) + (0xFFFFFFu - value);
}

alignas(16) static uint8_t tensor_arena[k{{CAMEL}}ArenaSize];
static unsigned char pixels[k{{CAMEL}}InputHeight * k{{CAMEL}}InputWidth * 3];

int main() {
  SYST_RVR = 0xFFFFFFu;
  SYST_CVR = 0;
  SYST_CSR = 7u;  // enable, interrupt on wrap, processor clock
  const tflite::Model* model = tflite::GetModel(g_{{NAME}}_model_data);
  static {{CAMEL}}OpResolver resolver;
  if (Register{{CAMEL}}Ops(resolver) != kTfLiteOk) {
    printf("edgestar-error op registration failed\n");
    return 1;
  }
  static tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, k{{CAMEL}}ArenaSize);
  if (interpreter.AllocateTensors() != kTfLiteOk) {
    printf("edgestar-error AllocateTensors failed with a %u B arena\n", (unsigned)k{{CAMEL}}ArenaSize);
    return 1;
  }
  FILE* f = fopen("edgestar_inputs.bin", "rb");
  if (f == NULL) {
    printf("edgestar-error cannot open edgestar_inputs.bin\n");
    return 1;
  }
  int8_t* input = interpreter.input(0)->data.int8;
  const int n = k{{CAMEL}}InputHeight * k{{CAMEL}}InputWidth;
  int images = 0;
  while (fread(pixels, 1, sizeof(pixels), f) == sizeof(pixels)) {
    for (int i = 0; i < n; ++i) {
      const int from = k{{CAMEL}}InputRotate180 ? n - 1 - i : i;
      for (int c = 0; c < 3; ++c) input[i * 3 + c] = k{{CAMEL}}InputLut[c][pixels[from * 3 + c]];
    }
    const uint64_t start = ticks();
    if (interpreter.Invoke() != kTfLiteOk) {
      printf("edgestar-error Invoke failed on image %d\n", images);
      return 1;
    }
    const uint64_t spent = ticks() - start;
    const int8_t* out = interpreter.output(0)->data.int8;
    printf("edgestar-out %d %llu ", images, (unsigned long long)spent);
    for (int k = 0; k < k{{CAMEL}}NumClasses; ++k) printf("%02x", (unsigned)(uint8_t)out[k]);
    printf("\n");
    ++images;
  }
  fclose(f);
  printf("edgestar-arena-used %u\n", (unsigned)interpreter.arena_used_bytes());
  printf("edgestar-done %d\n", images);
  return 0;
}
