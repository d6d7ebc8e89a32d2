// Minimal bare-metal start-up for the emulated Cortex-M boards `edgestar firmware --build` links
// for (QEMU mps3-an547, mps2-an386, mps2-an500): a vector table, a reset handler that enables
// the FPU (and MVE on the M55), copies .data, zeroes .bss, starts newlib's semihosting stdio
// (rdimon) and C++ constructors, then calls main(). A fault ends the emulation with exit code 3.
#include <stdint.h>
#include <string.h>

extern uint32_t __data_load, __data_start, __data_end, __bss_start__, __bss_end__, __stack_top;
extern int main(void);
extern void __libc_init_array(void);
extern void initialise_monitor_handles(void);
extern void exit(int) __attribute__((noreturn));
extern void _exit(int) __attribute__((noreturn));

void Reset_Handler(void);
void Fault_Handler(void) { _exit(3); }
void SysTick_Handler(void) __attribute__((weak, alias("Fault_Handler")));

// -nostartfiles: what crti/crtn would provide.
void _init(void) {}
void _fini(void) {}
void* __dso_handle = 0;

typedef void (*handler_t)(void);
__attribute__((section(".vectors"), used)) const handler_t edgestar_vectors[16] = {
    (handler_t)&__stack_top, Reset_Handler,
    Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler, Fault_Handler,  // NMI..UsageFault
    0, 0, 0, 0,
    Fault_Handler, Fault_Handler, 0, Fault_Handler,  // SVC, DebugMon, -, PendSV
    SysTick_Handler,
};

void Reset_Handler(void) {
#if defined(__ARM_FP) || defined(__ARM_FEATURE_MVE)
  *(volatile uint32_t*)0xE000ED88u |= (0xFu << 20);  // CPACR: full access to CP10/CP11 (FPU, MVE)
  __asm volatile("dsb\n\tisb" ::: "memory");
#endif
  memcpy(&__data_start, &__data_load, (size_t)((char*)&__data_end - (char*)&__data_start));
  memset(&__bss_start__, 0, (size_t)((char*)&__bss_end__ - (char*)&__bss_start__));
  initialise_monitor_handles();
  __libc_init_array();
  exit(main());
}
