/*
 * Startup code for the Cortex-M cores of QEMU's MPS2 boards (see mps2.ld for the memory map).
 *
 * It replaces newlib's crt0 (the program links with --specs=rdimon.specs -nostartfiles):
 *   - the vector table: initial stack pointer, reset handler, and a handler for every other
 *     exception that reports it and stops the program instead of hanging;
 *   - the reset handler: enables the FPU, copies .data, zeroes .bss, fills the stack with a
 *     pattern (so the program can measure how much of it was used), runs constructors, opens
 *     newlib's semihosting stdio, calls main and exits with main's status;
 *   - _exit, which ends the program through the semihosting call SYS_EXIT_EXTENDED, so QEMU's
 *     exit status is the program's.
 */

#include <stdint.h>
#include <stdlib.h>

#include "board.h"

/* Linker-script symbols (mps2.ld). */
extern uint32_t __data_load[];
extern uint32_t __data_start[];
extern uint32_t __data_end[];
extern uint32_t __bss_start[];
extern uint32_t __bss_end[];
extern uint32_t __stack_bottom[];
extern uint32_t __stack_top[];
extern void (*__preinit_array_start[])(void);
extern void (*__preinit_array_end[])(void);
extern void (*__init_array_start[])(void);
extern void (*__init_array_end[])(void);

int main(void);
void initialise_monitor_handles(void); /* librdimon: opens stdin/stdout/stderr on the host */

void Reset_Handler(void);
void Exception_Handler(void);
void distillc_report_exception(const uint32_t *frame, uint32_t exception);
void _exit(int status);
void _fini(void);

/* System control registers (ARMv7-M Architecture Reference Manual, B3.2). */
#define SCB_CCR (*(volatile uint32_t *)0xE000ED14u)
#define SCB_CFSR (*(volatile uint32_t *)0xE000ED28u)
#define SCB_HFSR (*(volatile uint32_t *)0xE000ED2Cu)
#define SCB_CPACR (*(volatile uint32_t *)0xE000ED88u)
#define CCR_DIV_0_TRP (1u << 4)
#define CPACR_CP10_CP11_FULL (0xFu << 20)

/* Semihosting (Arm "Semihosting for AArch32 and AArch64", v2): BKPT 0xAB on M-profile. */
#define SEMIHOSTING_SYS_WRITE0 0x04
#define SEMIHOSTING_SYS_EXIT_EXTENDED 0x20
#define ADP_STOPPED_APPLICATION_EXIT 0x20026u

/* Exit status of a program stopped by a fault or an unexpected interrupt. */
#define DISTILLC_EXCEPTION_EXIT_STATUS 3

#define IRQ_COUNT 32 /* the MPS2 boards' external interrupts; none is enabled */

typedef void (*vector_t)(void);

__attribute__((section(".vectors"), used)) static const vector_t vector_table[16 + IRQ_COUNT] = {
    [0] = (vector_t)__stack_top,
    [1] = Reset_Handler,
    [2 ... 16 + IRQ_COUNT - 1] = Exception_Handler,
};

static int semihosting_call(int operation, const void *argument)
{
    register int r0 __asm__("r0") = operation;
    register const void *r1 __asm__("r1") = argument;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void _exit(int status)
{
    const uint32_t block[2] = {ADP_STOPPED_APPLICATION_EXIT, (uint32_t)status};
    semihosting_call(SEMIHOSTING_SYS_EXIT_EXTENDED, block);
    for (;;) {
    }
}

/* newlib's __libc_fini_array calls _fini after .fini_array; crti.o/crtn.o, left out by
 * -nostartfiles, would define it.  Nothing to do here. */
void _fini(void)
{
}

void Reset_Handler(void)
{
    /* The FPU is off after reset; any floating-point instruction before this faults (NOCP). */
    SCB_CPACR |= CPACR_CP10_CP11_FULL;
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    /* An integer division by zero faults instead of silently giving 0, as it would crash
     * the host build too. */
    SCB_CCR |= CCR_DIV_0_TRP;

    for (uint32_t *src = __data_load, *dst = __data_start; dst < __data_end;) {
        *dst++ = *src++;
    }
    for (uint32_t *dst = __bss_start; dst < __bss_end;) {
        *dst++ = 0;
    }

    /* Fill the unused stack (all of it below this function's frame) with a pattern;
     * distillc_board_stack_used() finds the deepest word that was overwritten
     * (volatile: a memset call here would run on the stack it fills.) */
    uint32_t *sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    for (volatile uint32_t *p = __stack_bottom; p < sp - 16;) {
        *p++ = DISTILLC_STACK_PATTERN;
    }

    for (void (**f)(void) = __preinit_array_start; f < __preinit_array_end; ++f) {
        (*f)();
    }
    for (void (**f)(void) = __init_array_start; f < __init_array_end; ++f) {
        (*f)();
    }

    initialise_monitor_handles();
    exit(main()); /* exit flushes stdio, then calls _exit */
}

/* Every exception but reset lands here: pass the stacked frame and the exception number on. */
__attribute__((naked)) void Exception_Handler(void)
{
    __asm__ volatile("tst lr, #4\n\t"
                     "ite eq\n\t"
                     "mrseq r0, msp\n\t"
                     "mrsne r0, psp\n\t"
                     "mrs r1, ipsr\n\t"
                     "b distillc_report_exception\n\t");
}

static void write_string(const char *text)
{
    semihosting_call(SEMIHOSTING_SYS_WRITE0, text);
}

static void write_hex_field(const char *label, uint32_t value)
{
    char text[12] = "0x00000000 ";
    for (int i = 9; i >= 2; --i, value >>= 4) {
        text[i] = "0123456789abcdef"[value & 0xFu];
    }
    write_string(label);
    write_string(text);
}

/* Reports "distillc: <exception> ipsr=... pc=... cfsr=... hfsr=..." through SYS_WRITE0 (not
 * stdio: the fault may have broken it; QEMU prints it on its stderr) and stops the program. */
void distillc_report_exception(const uint32_t *frame, uint32_t exception)
{
    static const char *const names[] = {"thread mode", "Reset", "NMI", "HardFault",
                                        "MemManage fault", "BusFault", "UsageFault"};
    write_string("\ndistillc: ");
    write_string(exception < 7 ? names[exception] : "unexpected exception");
    write_hex_field(" ipsr=", exception);
    write_hex_field("pc=", frame[6]); /* the stacked return address: where it happened */
    write_hex_field("cfsr=", SCB_CFSR);
    write_hex_field("hfsr=", SCB_HFSR);
    write_string("\n");
    _exit(DISTILLC_EXCEPTION_EXIT_STATUS);
}
