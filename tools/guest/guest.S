/*
 * Ferry test guest: a tiny multiboot kernel that proves, across a live
 * migration, that the VM kept running and that its memory is intact, and
 * that can dirty memory faster than a migration can copy it.
 *
 * Build (GNU binutils only; testguest.build() does this):
 *     as --64 -o guest.o guest.S
 *     ld -m elf_x86_64 -T guest.ld -z max-page-size=0x1000 -o guest.elf guest.o
 * The object is x86-64, the linked image is ELF32/i386 (see guest.ld) because
 * qemu's multiboot loader only takes 32-bit ELF.  Run:
 *     qemu-system-x86_64 -m 128 -kernel guest.elf \
 *         -append "wss=16 rate=0 report=200 seed=1" -serial ...
 *
 * Command line (multiboot; qemu prepends the kernel file name, which is
 * ignored like any other unknown token):
 *     wss=<MiB>      working set rewritten over and over (default 16)
 *     rate=<MiB/s>   rewrite rate, 0 = as fast as possible (default 0)
 *     report=<ms>    report period (default 200, minimum 10)
 *     seed=<n>       pattern seed (default 1)
 *     zip=1          compressible pages (see "zip mode" below; default 0)
 *     crash=1        execute ud2 after the boot line (tests the fault path)
 * Numbers are decimal or 0x-prefixed hex.
 *
 * Disk variant (assembled with --defsym FERRY_DISK=1, testguest.build(
 * variant="disk"); the default image is not changed by any of it):
 *     disk=<n>       after every n-th report, write one 512-byte sector to
 *                    the master disk on the primary IDE channel (ATA PIO,
 *                    LBA28, ports 0x1f0-0x1f7, nIEN set), 0 = never (default)
 * Sector k of the run goes to LBA 8*k modulo 65536 (32 MiB), so every
 * write lands in a new 4 KiB block of the image until it wraps: on a
 * full file system each write needs new space.  The sector holds the
 * report counter, the LBA and the page magic.  The ATA command runs in
 * ring 0 (service call 3) and polls the status register until the drive
 * is done; qemu's werror=stop pauses the VM inside that poll and re-issues
 * the write when it resumes.  The boot line gains " disk=<n>", every
 * report " disk_writes=<n> disk_errors=<n> disk_last_err=<n>" (completed
 * writes, writes that ended with ERR/DF set or found no drive, and the
 * status of the last failed one: 256 = no drive).
 *
 * Verified disk writes (disk variant too; off unless dwrite > 0):
 *     dwrite=<KiB/s>   write rate of the workload, 0 = off (default)
 *     dsize=<MiB>      size of its region on each disk, 1 .. 4096 (default 16)
 *     dverify=<KiB/s>  rate of the verify sweep, 0 = no sweep (default:
 *                      dwrite / 4, at least 64); a huge value = flat out
 *     ddisks=<1|2>     disks used (default 1): the master of the primary IDE
 *                      channel, and with 2 also that of the secondary one
 * Rates are totals over the disks.  The region starts at LBA 65536 (32 MiB,
 * after the disk= sectors), so a disk needs 32 + dsize MiB.  It is cut into
 * 64 KiB blocks (128 sectors); each block goes to the disk in one WRITE DMA
 * command and comes back in one READ DMA command (LBA28, IDE bus-master
 * DMA): at boot one service call (4) scans PCI bus 0 through ports
 * 0xcf8/0xcfc for the first IDE controller (class 0x0101: the PIIX IDE of
 * qemu's pc machine; q35 has none, AHCI is another class), enables bus
 * mastering and takes the BMIDE ports from BAR4; each command is one
 * service call (5) that loads the PRD table address, writes the ATA
 * registers, starts the engine and polls the BMIDE status until the
 * transfer is done (nIEN set, interrupts stay off): about 20 port accesses
 * per 64 KiB.  Measured here (nested KVM, 2 host CPUs shared with other
 * work, images on ext4, cache=none): dwrite=20480 holds exactly on raw and
 * qcow2, one or two disks (with 25 MiB/s of read-back: 20 before the
 * writes, 5 by the default sweep); flat out about 40-200 MiB/s of writes
 * (each after its read-back) on raw and 15-90 MiB/s on a fresh qcow2
 * (allocation), 40-210 MiB/s of sweep, all varying with the host's load.
 * The buffers (2 x 64 KiB), the PRD tables and the generation table (8 bytes per block and
 * disk) sit in RAM between the kernel and the test region, which starts
 * after them (first_pfn moves up).
 * Sector l of a block written with generation g holds 64 quadwords:
 *     q[0] = l    q[1] = g    q[2] = DISK_MAGIC ^ seed    ("FERRYDSK")
 *     q[3] = c = mix(l, g, seed)    q[i] = c + i * K_STEP   (i = 4 .. 63)
 * g is a run-wide write sequence number (1, 2, ...: never 0, never reused),
 * so a block holds one generation in all its sectors and no two blocks hold
 * the same one.  Slot k (0 .. ddisks * blocks - 1) is block k / ddisks of
 * disk k % ddisks; writes go to slot 0, 1, 2, ... cyclically at the dwrite
 * pace (alternating disks), and the guest keeps the generation it last
 * wrote to each slot in its RAM (0 while a write is in flight or after a
 * failed one: not checked).  Read-backs (READ DMA) check every quadword of
 * every sector of a block against that: any mismatch (corrupted, stale,
 * missing, another block's data) makes the block bad.  There are two:
 *   - before each write the block about to be overwritten is read back, so
 *     every generation written is read back once, as late as possible: a
 *     write lost at any time before the rewrite (in a migration, say) is
 *     caught, and once the writes have gone round all slots after some
 *     moment, everything written before it has been read back after it;
 *   - the sweep, paced by dverify when no write is due, reads the slots
 *     with a generation from the last one downwards (against the writes, so
 *     it meets every block between two writes of it), to find a bad block
 *     sooner.
 * A paced schedule that falls more than 50 ms behind restarts from now (no
 * bursts after a pause).  The boot line gains
 *     dwrite=<KiB/s> dverify=<KiB/s> dsize=<MiB> ddisks=<n>
 *     dbmide=<BMIDE port, 0 = none> dlba=65536
 * and every report
 *     dwritten_kib=<n> dverified_kib=<n> dbad=<n> dlast_bad_lba=<n>
 *     dlast_bad_disk=<n> dsweeps=<n> derrors=<n> dlast_err=<n>
 * dwritten_kib/dverified_kib count completed writes/read-backs (64 per
 * block; read-backs before writes and by the sweep), dbad counts bad
 * blocks found (cumulative; a block that stays bad counts every time it is
 * read back; must stay 0), dlast_bad_lba/dlast_bad_disk locate the
 * first bad sector of the last bad block, dsweeps counts completed sweeps
 * over all slots, derrors counts failed commands and dlast_err is the last
 * one's status: ATA status | BMIDE status << 8, 65536 = no drive (the
 * workload stops), 131072 = no IDE controller.  A host can check an
 * image's region on its own: every block is all zeros (never written) or
 * 128 valid sectors of one generation (testguest.verify_disk_image).
 *
 * Privilege split.  On the machine this was written for, /dev/kvm is
 * software-assisted: guest ring 0 (and real mode) runs at about 1.5 million
 * instructions per second while ring 3 runs natively; syscall and int $n
 * misbehave, and ring 3 always runs with IOPL 0 whatever RFLAGS says (an
 * `out' from ring 3 raises #GP even after iretq with IOPL 3).  So:
 *   - ring 0 only builds the page tables, GDT, TSS and IDT, enters long mode,
 *     initialises COM1 and iretq's to ring 3 with RFLAGS = 0x2 (IOPL 0, IF 0);
 *   - all the work (command line, filling, rewriting, verifying, pacing,
 *     formatting) runs in ring 3 with interrupts disabled for the whole life
 *     of the guest: no interrupts, no syscalls;
 *   - the only port I/O after boot is done in ring 0 through a "service
 *     call": ring 3 executes `hlt' (privileged, so #GP), the #GP handler sees
 *     a ring-3 hlt, skips it, does the service (eax: 1 = write a line to
 *     COM1, 2 = one PIT measurement) and iretq's.  One trap per report line
 *     (about 150 bytes written from ring 0, ~1 ms here), plus one per PIT
 *     measurement at boot (usually one).
 *     The same path runs under TCG (IOPL 0 there too), so both accelerators
 *     execute identical code;
 *   - any other exception goes through the IDT to a ring-0 handler that
 *     prints a "fault" line and halts.
 *
 * Memory layout (physical = virtual, identity mapped with 2 MiB pages, user
 * accessible, over [0, 1 MiB + mem_upper) rounded up to 2 MiB, at most 4 GiB):
 *     0x009000             multiboot info (qemu), command line after the kernel
 *     0x100000 .. _kernel_end   this kernel: code, GDT/IDT/TSS, page tables,
 *                          stacks and all variables (.data, file-backed zeros)
 *     region_start .. ram_end   the test region: every 4 KiB page from the
 *                          first page after the kernel and the command line
 *                          up to 1 MiB + mem_upper (multiboot memory info)
 * mem_upper is the RAM below 4 GiB minus what the BIOS keeps at its top
 * (128 KiB with SeaBIOS), so with -m 128 the region is 32464 pages and
 * mem_mib (rounded up) is 128.  From -m 3584 on, qemu's pc machine puts part
 * of the RAM above 4 GiB, which this guest neither maps nor tests (-m 4096
 * shows mem_mib=3072).
 * Filling happens in ring 3 after the boot line; under this KVM the first
 * touch of guest RAM costs about 2.3 s per GiB (less with preallocated RAM).
 *
 * Test region pages.  Page with frame number pfn and generation g holds 512
 * little-endian quadwords:
 *     q[0] = pfn
 *     q[1] = g
 *     q[2] = PAGE_MAGIC ^ seed
 *     q[3] = c = mix(pfn, g, seed)               (splitmix64 finaliser)
 *     q[i] = c + i * K_STEP       for i = 4 .. 511
 * so any page can be verified on its own, and every rewrite changes every
 * quadword of the page.  The working set is the first wss_pages pages of the
 * region, rewritten cyclically: after G rewrites in total (G = "gen"), page j
 * of the working set must have generation G / W + (j < G % W ? 1 : 0) and
 * every other page generation 0.  The verifier checks the header against that
 * expectation, so a page that came back from an older generation (a stale
 * page after a migration) is caught as well as a corrupted one.
 *
 * Zip mode (zip=1).  The format above defeats every compression a migration
 * can use, which is the point of the default.  With zip=1 only the header
 * q[0..3] is as above; the body is the same in every page and generation:
 *     q[i] = Z[i & 7]             for i = 4 .. 511
 *     Z[k] = mix(k, 2^64 - 1, seed)   (computed once at boot, k = 0 .. 7)
 * so a rewrite changes q[1] and q[3] only (16 bytes: what xbzrle sends
 * against its cached copy), a page compresses on its own (its body repeats
 * every 64 bytes) and across pages (identical bodies, for stream
 * compressors such as multifd zstd/zlib).  The verifier still compares all
 * 512 quadwords with the expectation, so corruption anywhere in a page is
 * caught, and a stale page is caught by its header exactly as in the
 * default mode; the sum (XOR of q[3]) is the same in both modes.  Z never
 * contains the check word of a real page: generation 2^64 - 1 is never
 * written.
 *
 * Main loop: with rate=0, rewrite 256 pages (1 MiB) then verify 32 pages;
 * with rate>0, rewrite 16 pages whenever the TSC says they are due, else
 * verify 8 pages.  Every report period one line goes to COM1:
 *     FERRY-GUEST counter=<n> gen=<G> dirtied_mib=<G/256> verified=<pages>
 *         bad=<n> sum=<16 hex> mem_mib=<n> ms=<guest ms> sweeps=<n>
 *         last_bad=<pfn>
 * counter increments every report (it only resets on a reboot), verified
 * counts page verifications, bad counts failed ones (cumulative; a page that
 * stays bad is counted again every sweep), sum is the XOR of q[3] over the
 * pages outside the working set as read by the last complete sweep (constant
 * for a given memory size and seed, 0 before the first sweep completes),
 * ms is guest time since ring-3 entry by the TSC, sweeps counts complete
 * verification sweeps over the whole region, last_bad is the pfn of the last
 * bad page (0 if none).  The boot line comes first:
 *     FERRY-GUEST boot mem_mib=<n> wss=<MiB> rate=<MiB/s> report=<ms>
 *         seed=<n> tsc_khz=<n> tsc_src=<pit|cpuid|default> tsc_err_ppm=<n>
 *         first_pfn=<n> pages=<n> wss_pages=<n> zip=<0|1>
 * and a fault prints
 *     FERRY-GUEST fault vec=<n> err=<hex> rip=<hex> cs=<hex> rflags=<hex>
 *         cr2=<hex>
 * or, if there is no RAM above the kernel, "FERRY-GUEST fault reason=no-memory".
 * Output to COM1 (0x3f8, 115200 8N1, FIFO, no interrupts) polls LSR.THRE and
 * then fills the 16-byte FIFO; a wait longer than 2 ms drops the rest of the
 * line, so a host that stops reading the serial port cannot stall the guest.
 *
 * TSC calibration: if CPUID reports a hypervisor whose leaf range includes
 * 0x40000010 (KVM with invtsc and vmware-cpuid-freq=on), EAX of that leaf is
 * the TSC frequency in kHz (tsc_src=cpuid).  Otherwise (the default qemu64
 * CPU, and TCG) the PIT (tsc_src=pit), measured in ring 0 (service call 2,
 * see pit_measure): channel 2 counts down in mode 0 (gate on, speaker off via
 * port 0x61); the loop latches the count (port 0x43, read from port 0x42)
 * between two rdtsc, takes the tightest such bracket in the first 2.5 ms and
 * the tightest between 30 and 35 ms, and divides.  A vCPU descheduled by a
 * busy host only widens brackets, which are then not used, so the result
 * holds under load (measured: within 0.01 % with six guests on two host
 * CPUs, where simply waiting for OUT2 was off by up to 75 %).  Ring 3 repeats
 * the measurement (at most 8 times) until the uncertainty is below 200 ppm
 * and keeps the best; the boot line shows it as tsc_err_ppm.  Under TCG the
 * TSC is the host's and the PIT runs on qemu's virtual clock (real time), so
 * this works there too.  A result outside 10 MHz .. 100 GHz makes the guest
 * assume 1 GHz (tsc_src=default).  All pacing and the "ms" field use it.
 */

        .set MB_MAGIC,          0x1BADB002
        .set MB_FLAGS,          0x00000003      /* align modules, memory info */
        .set MB_BOOT_MAGIC,     0x2BADB002

        .set KCODE,             0x08
        .set KDATA,             0x10
        .set UDATA,             0x18
        .set UCODE,             0x20
        .set TSSSEL,            0x28

        .set COM1,              0x3f8
        .set PIT_HZ,            1193182
        .set PIT_START_WINDOW,  3000            /* 2.5 ms: pick the start sample */
        .set PIT_END_WINDOW,    36000           /* 30.2 ms .. */
        .set PIT_END,           42000           /* .. 35.2 ms: pick the end sample */
        .set PIT_ATTEMPTS,      8
        .set PIT_GOOD_PPM,      200             /* stop at this uncertainty */

        .set PAGE_MAGIC,        0x4741505952524546      /* "FERRYPAG" */
        .set K_STEP,            0x9E3779B97F4A7C15
        .set MIX_A,             0x9E3779B97F4A7C15
        .set MIX_B,             0xC2B2AE3D27D4EB4F
        .set MIX_C,             0x165667B19E3779F9
        .set MIX_M1,            0xBF58476D1CE4E5B9
        .set MIX_M2,            0x94D049BB133111EB

        .set SVC_WRITE,         1               /* ring-3 service calls */
        .set SVC_PIT,           2
        .ifdef FERRY_DISK
        .set SVC_DISK,          3
        .set ATA_DATA,          0x1f0
        .set ATA_COUNT,         0x1f2
        .set ATA_LBA0,          0x1f3
        .set ATA_LBA1,          0x1f4
        .set ATA_LBA2,          0x1f5
        .set ATA_DRIVE,         0x1f6
        .set ATA_CMD,           0x1f7           /* status on read */
        .set ATA_CTRL,          0x3f6
        .set ATA2_DATA,         0x170           /* secondary channel (ddisks=2) */
        .set ATA2_CTRL,         0x376
        .set ATA_WRITE_SECTORS, 0x30
        .set DISK_SPAN,         65536           /* sectors written cyclically */
        .set SVC_IDE_PROBE,     4
        .set SVC_DMA,           5
        .set ATA_READ_DMA,      0xc8
        .set ATA_WRITE_DMA,     0xca
        .set DISK_MAGIC,        0x4B53445952524546      /* "FERRYDSK" */
        .set DREGION_LBA,       65536           /* dwrite region: after DISK_SPAN */
        .set DBLOCK_SECTORS,    128             /* 64 KiB per block = per DMA command */
        .set DSIZE_MAX_MIB,     4096
        .set DERR_NO_DRIVE,     0x10000
        .set DERR_NO_CONTROLLER, 0x20000
        .endif
        .set LINEBUF_SIZE,      512

        .set FAST_WRITE_PAGES,  256
        .set FAST_VERIFY_PAGES, 32
        .set PACED_WRITE_PAGES, 16
        .set PACED_VERIFY_PAGES, 8

/* ------------------------------------------------------------------------ */
        .section .multiboot, "a"
        .balign 4
multiboot_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------------ */
/* Ring 0, 32-bit protected mode: entered by the multiboot loader with
 * EAX = 0x2BADB002, EBX = multiboot info, flat segments, paging off, IF = 0.
 * Kept as short as possible: ring 0 is slow here.                           */
        .text
        .code32
        .globl _start
_start:
        cli
        cld
        movl $stack0_top, %esp
        movl %ebx, mbi_ptr
        movl %eax, mb_magic

        /* number of 2 MiB pages: ceil((1 MiB + mem_upper) / 2 MiB), max 2048 */
        movl $32, %ecx                  /* no memory info: map 64 MiB */
        cmpl $MB_BOOT_MAGIC, %eax
        jne 1f
        testl $1, (%ebx)
        jz 1f
        movl 8(%ebx), %ecx              /* mem_upper, KiB above 1 MiB */
        addl $1024 + 2047, %ecx
        shrl $11, %ecx
        cmpl $2048, %ecx
        jbe 1f
        movl $2048, %ecx
1:
        movl %ecx, map_2m_pages
        movl $pdpt + 7, pml4            /* present, writable, user */
        movl $pd + 0x0007, pdpt
        movl $pd + 0x1007, pdpt + 8
        movl $pd + 0x2007, pdpt + 16
        movl $pd + 0x3007, pdpt + 24
        movl $pd, %edi
        movl $0x87, %eax                /* present, writable, user, 2 MiB */
2:      movl %eax, (%edi)
        addl $8, %edi
        addl $0x200000, %eax
        decl %ecx
        jnz 2b

        lgdt gdt_ptr
        movw $KDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %fs
        movw %ax, %gs
        movw %ax, %ss
        movl %cr4, %eax
        orl $0x20, %eax                 /* PAE */
        movl %eax, %cr4
        movl $pml4, %eax
        movl %eax, %cr3
        movl $0xC0000080, %ecx          /* EFER */
        rdmsr
        orl $0x100, %eax                /* LME */
        wrmsr
        movl %cr0, %eax
        orl $0x80000000, %eax           /* PG: long mode active */
        movl %eax, %cr0
        ljmp $KCODE, $long_entry

/* Ring 0, 64-bit: TSS, IDT, then iretq to ring 3. */
        .code64
long_entry:
        movw $KDATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movw %ax, %fs
        movw %ax, %gs
        movq $stack0_top, %rsp

        movq $tss, %rax
        movq $stack0_top, %rcx
        movq %rcx, 4(%rax)              /* TSS.rsp0: stack for exceptions */
        movw %ax, gdt_tss + 2
        shrq $16, %rax
        movb %al, gdt_tss + 4
        movb %ah, gdt_tss + 7
        movw $TSSSEL, %ax
        ltr %ax

        movq $idt, %rdi
        movq $exc_stubs, %rax
        movl $32, %ecx
3:      movw %ax, (%rdi)
        movw $KCODE, 2(%rdi)
        movw $0x8E00, 4(%rdi)           /* present, DPL 0, interrupt gate */
        movq %rax, %rdx
        shrq $16, %rdx
        movw %dx, 6(%rdi)
        shrq $16, %rdx
        movl %edx, 8(%rdi)
        addq $16, %rax
        addq $16, %rdi
        decl %ecx
        jnz 3b
        lidt idt_ptr

        call serial_init

        pushq $(UDATA | 3)              /* ss */
        pushq $stack3_top               /* rsp */
        pushq $0x0002                   /* rflags: IOPL 0, IF 0 */
        pushq $(UCODE | 3)              /* cs */
        pushq $user_main                /* rip */
        iretq

/* Exception stubs, 16 bytes apart: push a zero error code where the CPU does
 * not push one, push the vector, go to the common handler (ring 0). */
        .balign 16
exc_stubs:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 16
        .if \v == 13
        jmp gp_entry
        .else
        .if (\v == 8) || (\v == 10) || (\v == 11) || (\v == 12) || (\v == 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
        .else
        pushq $0
        .endif
        pushq $\v
        jmp exc_common
        .endif
        .endr

/* #GP.  A `hlt' executed in ring 3 is a service call from the ring-3 code
 * (eax = service, arguments in rsi/rdx; clobbers like a function call:
 * rax, rcx, rdx, rsi, rdi, r8-r11): skip the hlt, do the service, iretq.
 * Anything else is a real fault.  Frame: err, rip, cs, rflags, rsp, ss. */
gp_entry:
        testb $3, 16(%rsp)
        jz 8f
        pushq %rcx
        movq 16(%rsp), %rcx
        cmpb $0xf4, (%rcx)
        popq %rcx
        jne 8f
        cmpl $SVC_WRITE, %eax
        je 1f
        .ifdef FERRY_DISK
        cmpl $SVC_DISK, %eax
        je 7f
        cmpl $SVC_DMA, %eax
        je 5f
        cmpl $SVC_IDE_PROBE, %eax
        je 6f
        .endif
        cmpl $SVC_PIT, %eax
        jne 8f
        incq 8(%rsp)
        addq $8, %rsp
        call pit_measure
        iretq
1:      incq 8(%rsp)
        addq $8, %rsp
        call serial_write
        iretq
        .ifdef FERRY_DISK
7:      incq 8(%rsp)
        addq $8, %rsp
        call ata_write
        iretq
5:      incq 8(%rsp)
        addq $8, %rsp
        call ide_dma
        iretq
6:      incq 8(%rsp)
        addq $8, %rsp
        call ide_probe
        iretq
        .endif
8:      pushq $13
        jmp exc_common

        .ifdef FERRY_DISK
/* ata_write (ring 0): write disk_buf to sector disk_lba of the primary
 * master (ATA PIO, LBA28).  Returns eax = the final status register, or
 * 0x100 if there is no drive (status neither busy nor asking for data
 * after the command; an absent drive reads as 0).  The waits for BSY to
 * clear have no time-out: qemu finishes every request or, with
 * werror=stop, pauses the VM inside the wait and re-issues the request
 * when it resumes; a bound counted in status reads was seen to expire on a
 * heavily loaded host (each read is a VM exit competing with qemu's main
 * loop).  Clobbers rax, rcx, rdx, rsi. */
ata_write:
        movw $ATA_CTRL, %dx
        movb $0x02, %al                 /* nIEN: no interrupts */
        outb %al, %dx
        movw $ATA_CMD, %dx
1:      inb %dx, %al                    /* wait for not BSY */
        testb $0x80, %al
        jnz 1b
        movq disk_lba, %rcx
        movl %ecx, %eax
        shrl $24, %eax
        andb $0x0f, %al
        orb $0xe0, %al                  /* LBA mode, master */
        movw $ATA_DRIVE, %dx
        outb %al, %dx
        movb $1, %al
        movw $ATA_COUNT, %dx
        outb %al, %dx
        movb %cl, %al
        movw $ATA_LBA0, %dx
        outb %al, %dx
        movb %ch, %al
        movw $ATA_LBA1, %dx
        outb %al, %dx
        movl %ecx, %eax
        shrl $16, %eax
        movw $ATA_LBA2, %dx
        outb %al, %dx
        movb $ATA_WRITE_SECTORS, %al
        movw $ATA_CMD, %dx
        outb %al, %dx
3:      inb %dx, %al                    /* wait for DRQ (or an error) */
        testb $0x80, %al
        jnz 3b
        testb $0x21, %al                /* ERR, DF */
        jnz 9f
        testb $0x08, %al                /* DRQ */
        jz 8f                           /* neither busy nor ready: no drive */
        movq $disk_buf, %rsi
        movl $256, %ecx
        movw $ATA_DATA, %dx
        rep outsw
        movw $ATA_CMD, %dx
6:      inb %dx, %al                    /* wait for the write to complete */
        testb $0x80, %al
        jnz 6b
        jmp 9f
8:      movl $0x100, %eax
        ret
9:      movzbl %al, %eax
        ret

/* ide_probe (ring 0): find the first IDE controller (PCI class 0x0101) on
 * bus 0 through configuration mechanism #1 (ports 0xcf8/0xcfc), enable its
 * I/O decoding and bus mastering, set nIEN on both channels.  Returns
 * eax = its bus-master (BMIDE) I/O base from BAR4, 0 if there is none.  One
 * service call scans all 256 functions: 512 port accesses, a few ms here.
 * Clobbers rax, rcx, rdx, rsi. */
ide_probe:
        movl $0x80000008, %ecx          /* bus 0, device 0, function 0, reg 8 */
1:      movl %ecx, %eax
        movw $0xcf8, %dx
        outl %eax, %dx
        movw $0xcfc, %dx
        inl %dx, %eax                   /* class, subclass, prog-if, revision */
        shrl $16, %eax
        cmpl $0x0101, %eax              /* mass storage, IDE */
        je 2f
        addl $0x100, %ecx               /* next function */
        cmpl $0x80010008, %ecx
        jb 1b
        xorl %eax, %eax
        ret
2:      movl %ecx, %esi
        andl $0xffffff00, %esi
        leal 0x04(%rsi), %eax           /* command register */
        movw $0xcf8, %dx
        outl %eax, %dx
        movw $0xcfc, %dx
        inl %dx, %eax
        andl $0xffff, %eax              /* leave the status bits alone */
        orl $0x05, %eax                 /* I/O space, bus master */
        outl %eax, %dx
        leal 0x20(%rsi), %eax           /* BAR4: bus-master registers */
        movw $0xcf8, %dx
        outl %eax, %dx
        movw $0xcfc, %dx
        inl %dx, %eax
        andl $0xfffc, %eax
        movl %eax, %esi
        movw $ATA_CTRL, %dx
        movb $0x02, %al                 /* nIEN: completion is polled */
        outb %al, %dx
        movw $ATA2_CTRL, %dx
        outb %al, %dx
        movl %esi, %eax
        ret

/* ide_dma (ring 0): one bus-master DMA command on the master drive of a
 * channel.  r11 = channel (0 primary: ports 0x1f0-0x1f7, BMIDE + 0;
 * 1 secondary: 0x170-0x177, BMIDE + 8), edi = ATA command (READ DMA or
 * WRITE DMA, LBA28), rsi = physical address of the PRD table, rdx = LBA,
 * ecx = sector count (1..255; the PRD table must describe exactly that many
 * bytes, else qemu keeps the engine active).  Returns eax = ATA status |
 * bus-master status << 8, or DERR_NO_DRIVE if the drive did not take the
 * command (status 0: no drive; the engine is not started then, so nothing
 * waits forever).  Like ata_write, the waits have no time-out: qemu
 * completes every request or, with werror/rerror=stop, pauses the VM inside
 * the wait and re-issues the request on resume.  17 port accesses plus the
 * polls per command.  Clobbers rax, rcx, rdx, rsi, rdi, r8-r10. */
ide_dma:
        movq %rdx, %r8                  /* LBA */
        movl %ecx, %r9d                 /* sectors */
        movl %edi, %r10d                /* command */
        movl %esi, %edi                 /* PRD table */
        movl $ATA_DATA, %ecx            /* the channel's command block */
        movzwl dbmide, %esi             /* and its bus-master registers */
        testl %r11d, %r11d
        jz 1f
        movl $ATA2_DATA, %ecx
        addl $8, %esi
1:      leal 7(%rcx), %edx              /* status */
2:      inb %dx, %al                    /* wait for not BSY */
        testb $0x80, %al
        jnz 2b
        movl %esi, %edx
        xorl %eax, %eax
        outb %al, %dx                   /* BM command: stop */
        leal 4(%rsi), %edx
        movl %edi, %eax
        outl %eax, %dx                  /* BM PRD table address */
        leal 2(%rsi), %edx
        movb $0x06, %al
        outb %al, %dx                   /* BM status: clear error, interrupt */
        movl %r8d, %eax
        shrl $24, %eax
        andb $0x0f, %al
        orb $0xe0, %al                  /* LBA mode, master */
        leal 6(%rcx), %edx
        outb %al, %dx
        movl %r9d, %eax
        leal 2(%rcx), %edx
        outb %al, %dx                   /* sector count */
        movl %r8d, %eax
        leal 3(%rcx), %edx
        outb %al, %dx                   /* LBA 7:0 */
        shrl $8, %eax
        incl %edx
        outb %al, %dx                   /* LBA 15:8 */
        shrl $8, %eax
        incl %edx
        outb %al, %dx                   /* LBA 23:16 */
        movl %r10d, %eax
        leal 7(%rcx), %edx
        outb %al, %dx                   /* command */
        inb %dx, %al                    /* DRQ: the drive waits for the DMA */
        testb $0x21, %al                /* ERR, DF: refused at once */
        jnz 9f
        testb $0x88, %al
        jz 8f                           /* neither busy nor ready: no drive */
        movb $0x01, %al                 /* BM command: start ... */
        cmpb $ATA_READ_DMA, %r10b
        jne 3f
        movb $0x09, %al                 /* ... writing to memory */
3:      movl %esi, %edx
        outb %al, %dx
        leal 2(%rsi), %edx
4:      inb %dx, %al                    /* BM status: wait for "active" to clear */
        testb $0x01, %al
        jnz 4b
        movzbl %al, %r9d
        shll $8, %r9d
        movl %esi, %edx
        xorl %eax, %eax
        outb %al, %dx                   /* BM command: stop */
        leal 7(%rcx), %edx
5:      inb %dx, %al
        testb $0x80, %al
        jnz 5b
        movzbl %al, %eax
        orl %r9d, %eax
        ret
8:      movl $DERR_NO_DRIVE, %eax
        ret
9:      movzbl %al, %eax
        ret
        .endif

/* pit_measure (ring 0): one TSC measurement against PIT channel 2.
 * Channel 2 counts down from 0xffff in mode 0 (gate on, speaker off via port
 * 0x61).  The loop latches the count (port 0x43) between two rdtsc, so each
 * sample's PIT time lies inside a known TSC bracket.  The start sample is the
 * tightest bracket during the first PIT_START_WINDOW ticks, the end sample
 * the tightest from PIT_END_WINDOW to PIT_END ticks (about 30-35 ms later):
 * a vCPU descheduled by a busy host only widens brackets, and wide ones are
 * not used.  Results in cal_tsc (TSC ticks), cal_pit (PIT ticks) and cal_unc
 * (TSC ticks of uncertainty); rax = 1, or 0 if the counter wrapped (stalled
 * for more than 55 ms).  Clobbers rcx, rdx, r8-r10. */
pit_measure:
        inb $0x61, %al
        andb $0xfc, %al
        orb $0x01, %al
        outb %al, $0x61
        movb $0xb0, %al                 /* channel 2, lo/hi byte, mode 0, binary */
        outb %al, $0x43
        movb $0xff, %al
        outb %al, $0x42
        outb %al, $0x42                 /* count 0xffff (54.9 ms) */
        movq $-1, cal_c0
        movq $-1, cal_ws
        movq $-1, cal_we
1:      call rdtsc64
        movq %rax, %r8                  /* before the latch */
        movb $0x80, %al                 /* latch channel 2 */
        outb %al, $0x43
        call rdtsc64
        movq %rax, %r9
        subq %r8, %r9                   /* bracket width */
        movq %r9, %r10
        shrq $1, %r10
        addq %r8, %r10                  /* bracket midpoint */
        inb $0x42, %al
        movzbl %al, %ecx
        inb $0x42, %al
        movzbl %al, %eax
        shll $8, %eax
        orl %eax, %ecx                  /* the latched count */
        movq cal_c0, %rax
        cmpq $-1, %rax
        jne 2f
        movq %rcx, %rax
        movq %rcx, cal_c0
        movq %rcx, cal_prev
2:      cmpq cal_prev, %rcx
        ja 9f                           /* wrapped: stalled far too long */
        movq %rcx, cal_prev
        subq %rcx, %rax                 /* PIT ticks since the first sample */
        cmpq $PIT_START_WINDOW, %rax
        jae 3f
        cmpq cal_ws, %r9
        jae 1b
        movq %r9, cal_ws
        movq %r10, cal_ts
        movq %rcx, cal_cs
        jmp 1b
3:      cmpq $PIT_END_WINDOW, %rax
        jb 1b
        cmpq cal_we, %r9
        jae 4f
        movq %r9, cal_we
        movq %r10, cal_te
        movq %rcx, cal_ce
4:      cmpq $PIT_END, %rax
        jb 1b
        movq cal_te, %rax
        subq cal_ts, %rax
        movq %rax, cal_tsc
        movq cal_cs, %rax
        subq cal_ce, %rax
        movq %rax, cal_pit
        movq cal_ws, %rax
        addq cal_we, %rax
        shrq $1, %rax
        movq %rax, cal_unc
        movl $1, %eax
        ret
9:      xorl %eax, %eax
        ret

exc_common:
        movq $0, linelen
        movq $s_fault, %rsi
        call puts
        movq (%rsp), %rax
        call putdec
        movq $s_err, %rsi
        call puts
        movq 8(%rsp), %rax
        call puthex
        movq $s_rip, %rsi
        call puts
        movq 16(%rsp), %rax
        call puthex
        movq $s_cs, %rsi
        call puts
        movq 24(%rsp), %rax
        call puthex
        movq $s_rflags, %rsi
        call puts
        movq 32(%rsp), %rax
        call puthex
        movq $s_cr2, %rsi
        call puts
        movq %cr2, %rax
        call puthex
        call line_flush
4:      cli
        hlt
        jmp 4b

/* ------------------------------------------------------------------------ */
/* Ring 3.  Register convention for the helpers below: arguments and scratch
 * in rax, rcx, rdx, rsi, rdi, r8-r11 (clobbered unless stated), rbx, rbp,
 * r12-r15 preserved.                                                        */
user_main:
        call rdtsc64
        movq %rax, tsc_boot
        call parse_cmdline
        call setup_memory
        call setup_zip
        call calibrate_tsc
        .ifdef FERRY_DISK
        call disk_setup
        .endif
        call print_boot
        cmpq $0, npages
        je no_memory
        cmpq $0, crash
        je 1f
        ud2
1:      call fill_all
        call rdtsc64
        movq %rax, next_write
        addq report_ticks, %rax
        movq %rax, next_report

main_loop:
        cmpq $0, wss_pages
        je .Lverify_fast
        cmpq $0, rate_mib
        jne .Lpaced
        movl $FAST_WRITE_PAGES, %r12d
        call rewrite_pages
.Lverify_fast:
        movl $FAST_VERIFY_PAGES, %r12d
        call verify_pages
        jmp .Lreport
.Lpaced:
        call rdtsc64
        movq next_write, %rcx
        cmpq %rcx, %rax
        jb .Lpaced_verify
        movq %rax, %rdx
        subq %rcx, %rdx                 /* how far behind schedule */
        cmpq catchup_ticks, %rdx
        jbe 1f
        movq %rax, %rcx                 /* too far behind (paused?): resync */
1:      addq batch_ticks, %rcx
        movq %rcx, next_write
        movl $PACED_WRITE_PAGES, %r12d
        call rewrite_pages
.Lpaced_verify:
        movl $PACED_VERIFY_PAGES, %r12d
        call verify_pages
.Lreport:
        .ifdef FERRY_DISK
        call disk_work
        .endif
        call rdtsc64
        cmpq next_report, %rax
        jb main_loop
        movq %rax, %rbx
        call report
        .ifdef FERRY_DISK
        call disk_tick
        .endif
        movq next_report, %rcx
        addq report_ticks, %rcx
        cmpq %rbx, %rcx
        ja 2f
        movq %rbx, %rcx                 /* more than one period late: resync */
        addq report_ticks, %rcx
2:      movq %rcx, next_report
        jmp main_loop

no_memory:
        movq $0, linelen
        movq $s_nomem, %rsi
        call puts
        call line_flush
3:      pause                           /* ring 3 cannot hlt */
        jmp 3b

/* rewrite_pages: r12 = number of working-set pages to rewrite (clobbered) */
rewrite_pages:
1:      movq wcur, %r8
        movq wround, %r9
        incq %r9
        call write_page
        incq gen_total
        movq wcur, %rax
        incq %rax
        cmpq wss_pages, %rax
        jb 2f
        xorl %eax, %eax
        incq wround
2:      movq %rax, wcur
        decq %r12
        jnz 1b
        ret

/* verify_pages: r12 = number of pages to verify (clobbered) */
verify_pages:
1:      movq vcur, %r8
        xorl %r9d, %r9d                 /* expected generation */
        cmpq wss_pages, %r8
        jae 2f
        movq wround, %r9
        cmpq wcur, %r8
        jae 2f
        incq %r9
2:      call verify_page
        incq verified
        testl %eax, %eax
        jz 3f
        incq bad
        movq %rdi, last_bad
3:      cmpq wss_pages, %r8
        jb 4f
        xorq %rdx, sweep_acc
4:      incq %r8
        cmpq npages, %r8
        jb 5f
        xorl %r8d, %r8d
        movq sweep_acc, %rax
        movq %rax, sum
        movq $0, sweep_acc
        incq sweeps
5:      movq %r8, vcur
        decq %r12
        jnz 1b
        ret

/* fill_all: every page of the region to generation 0 */
fill_all:
        xorl %r12d, %r12d
1:      cmpq npages, %r12
        jae 2f
        movq %r12, %r8
        xorl %r9d, %r9d
        call write_page
        incq %r12
        jmp 1b
2:      ret

        .ifdef FERRY_DISK
/* disk_tick: after a report, every disk_every-th time, write one sector
 * through the ring-0 service and count the outcome (rbx preserved). */
disk_tick:
        movq disk_every, %rax
        testq %rax, %rax
        jz 9f
        decq disk_left
        jg 9f
        movq %rax, disk_left
        movq counter, %rax
        movq %rax, disk_buf
        movq disk_lba, %rax
        movq %rax, disk_buf + 8
        movabsq $PAGE_MAGIC, %rax
        movq %rax, disk_buf + 16
        movl $SVC_DISK, %eax
        hlt                             /* -> #GP -> gp_entry -> ata_write */
        testl $0x121, %eax              /* ERR, DF, or no drive */
        jnz 1f
        incq disk_writes
        jmp 2f
1:      incq disk_errors
        movq %rax, disk_last_err
2:      movq disk_lba, %rax
        addq $8, %rax
        cmpq $DISK_SPAN, %rax
        jb 3f
        xorl %eax, %eax
3:      movq %rax, disk_lba
9:      ret

/* disk_reserve (from setup_memory): with dwrite > 0, take the DMA buffers,
 * the PRD tables and the generation table from the RAM at rcx (the first
 * free page after the kernel and the command line) and return rcx = the
 * first page after them, where the test region then starts.  Layout, from
 * rcx rounded up to 64 KiB (a PRD entry must not cross a 64 KiB boundary):
 * write buffer (64 KiB), read buffer (64 KiB), PRD tables (4 KiB: write
 * table at +0, read table at +16), then the
 * generation table (8 bytes per block and disk).  Clamps dsize to
 * 1 .. DSIZE_MAX_MIB (0 means the default, 16) and ddisks to 1 or 2.
 * Preserves rax; clobbers rdx. */
disk_reserve:
        movq dsize_mib, %rdx
        testq %rdx, %rdx
        jnz 1f
        movl $16, %edx
1:      cmpq $DSIZE_MAX_MIB, %rdx
        jbe 2f
        movl $DSIZE_MAX_MIB, %edx
2:      movq %rdx, dsize_mib
        shlq $4, %rdx                   /* 16 blocks of 64 KiB per MiB */
        movq %rdx, dnblocks
        cmpq $2, ddisks                 /* 1 or 2 disks */
        je 3f
        movq $1, ddisks
3:      cmpq $1, ddisks
        je 4f
        shlq $1, %rdx
4:      movq %rdx, dnslots              /* (disk, block) pairs */
        cmpq $0, dwrite_kib
        je 9f
        addq $0xffff, %rcx
        andq $-0x10000, %rcx
        movq %rcx, dwbuf
        leaq 0x10000(%rcx), %rdx
        movq %rdx, drbuf
        leaq 0x20000(%rcx), %rdx
        movq %rdx, dprd
        leaq 0x21000(%rcx), %rdx
        movq %rdx, dgen_tab
        movq dnslots, %rcx
        leaq 4095(%rdx,%rcx,8), %rcx
        andq $-4096, %rcx
9:      ret

/* disk_setup (ring 3, before the boot line): resolve the sweep rate
 * (default: dwrite / 4, at least 64 KiB/s), and with dwrite > 0 and a test region: find the IDE
 * controller (service call), write the PRD tables, clear the generation
 * table, derive the pacing periods (TSC ticks per 64 KiB block). */
disk_setup:
        cmpq $-1, dverify_kib
        jne 1f
        movq dwrite_kib, %rax           /* default sweep: a quarter of dwrite */
        shrq $2, %rax
        movl $64, %ecx
        cmpq %rcx, %rax
        cmovbq %rcx, %rax
        movq %rax, dverify_kib
1:      cmpq $0, dwrite_kib
        je 9f
        cmpq $0, npages
        je 9f
        movl $SVC_IDE_PROBE, %eax
        hlt                             /* -> #GP -> gp_entry -> ide_probe */
        movq %rax, dbmide
        testq %rax, %rax
        jnz 2f
        incq derrors
        movq $DERR_NO_CONTROLLER, dlast_err
        ret
2:      movq dprd, %rdi
        movq dwbuf, %rax
        movl %eax, (%rdi)
        movl $0x80000000, 4(%rdi)       /* 0 bytes = 64 KiB, end of table */
        movq drbuf, %rax
        movl %eax, 16(%rdi)
        movl $0x80000000, 20(%rdi)
        movq dgen_tab, %rdi
        movq dnslots, %rcx
        leaq -1(%rcx), %rax
        movq %rax, dvcur                /* the sweep runs downwards */
        xorl %eax, %eax
        rep stosq
        movq tsc_hz, %rax
        shlq $6, %rax
        xorl %edx, %edx
        divq dwrite_kib
        movq %rax, dwrite_ticks
        movq dverify_kib, %rcx
        testq %rcx, %rcx
        jz 3f                           /* 0: no sweep */
        movq tsc_hz, %rax
        shlq $6, %rax
        xorl %edx, %edx
        divq %rcx
        movq %rax, dverify_ticks
3:      movq $1, dactive
9:      ret

/* disk_work (main loop): write the next block when the dwrite pacing says
 * it is due, else let the sweep read back the next written block when the
 * dverify pacing says so (never with dverify=0).  A schedule that fell more
 * than 50 ms behind (a paused VM, a slow disk) restarts from now instead of
 * bursting (catchup_ticks, as for memory). */
disk_work:
        cmpq $0, dactive
        je 9f
        call rdtsc64
        movq next_dwrite, %rcx
        cmpq %rcx, %rax
        jb 2f
        movq %rax, %rdx
        subq %rcx, %rdx
        cmpq catchup_ticks, %rdx
        jbe 1f
        movq %rax, %rcx
1:      addq dwrite_ticks, %rcx
        movq %rcx, next_dwrite
        jmp disk_write_block
2:      cmpq $0, dverify_kib
        je 9f                           /* no sweep */
        movq dverify_ticks, %rdx
        movq next_dverify, %rcx
        cmpq %rcx, %rax
        jb 9f
        movq %rax, %rsi
        subq %rcx, %rsi
        cmpq catchup_ticks, %rsi
        jbe 3f
        movq %rax, %rcx
3:      addq %rdx, %rcx
        movq %rcx, next_dverify
        jmp disk_verify_block
9:      ret

/* disk_slot: slot rbx (an index into the generation table) -> rax = disk
 * (0 or 1), r12 = first LBA of the block.  With two disks the slots
 * alternate between them.  Clobbers rcx. */
disk_slot:
        movq ddisks, %rcx
        decq %rcx                       /* 0 or 1: the shift and the mask */
        movq %rbx, %rax
        andq %rcx, %rax
        movq %rbx, %r12
        shrq %cl, %r12
        shlq $7, %r12
        addq $DREGION_LBA, %r12
        ret

/* disk_write_block: slot dwcur gets generation ++dseq (WRITE DMA, one
 * command of 128 sectors).  First the generation it holds is read back and
 * checked (disk_verify_slot), so every generation written is read back
 * once, as late as possible: a block that went stale or was lost at any
 * time before its rewrite (a migration, say) is caught.  Its
 * generation-table entry is 0 (unknown, not checked) while the write runs
 * and if it fails. */
disk_write_block:
        pushq %rbx
        pushq %r12
        pushq %r13
        pushq %r14
        movq dwcur, %rbx
        movq dgen_tab, %rax
        movq (%rax,%rbx,8), %r13
        testq %r13, %r13
        jz 4f
        call disk_verify_slot           /* read back what is overwritten */
4:      incq dseq
        movq dseq, %r13
        call disk_slot
        movq %rax, %r14                 /* disk */
        movq dwbuf, %r10
        xorl %r8d, %r8d
1:      leaq (%r12,%r8), %rdi
        movq %r13, %rsi
        call disk_fill_sector
        incq %r8
        cmpq $DBLOCK_SECTORS, %r8
        jb 1b
        movq dgen_tab, %rax
        movq $0, (%rax,%rbx,8)
        movl $SVC_DMA, %eax
        movl $ATA_WRITE_DMA, %edi
        movq dprd, %rsi
        movq %r12, %rdx
        movl $DBLOCK_SECTORS, %ecx
        movq %r14, %r11
        hlt                             /* -> #GP -> gp_entry -> ide_dma */
        call disk_status
        jnz 2f
        movq dgen_tab, %rax
        movq %r13, (%rax,%rbx,8)
        addq $64, dwritten_kib
2:      incq %rbx
        cmpq dnslots, %rbx
        jb 3f
        xorl %ebx, %ebx
3:      movq %rbx, dwcur
        popq %r14
        popq %r13
        popq %r12
        popq %rbx
        ret

/* disk_verify_block: the sweep.  Read back the next slot that has a
 * generation and check it (disk_verify_slot).  The sweep runs from the
 * last slot down to slot 0 (dvcur wrapping completes a sweep), against the
 * writes, which go upwards, so that it meets every block between two writes
 * of it instead of trailing the writes at the same distance.  (Every
 * generation is read back before it is overwritten anyway: see
 * disk_write_block; the sweep finds a bad block sooner.) */
disk_verify_block:
        pushq %rbx
        pushq %r13
        pushq %r14
        movq dnslots, %r14              /* look at most this many slots */
1:      movq dvcur, %rbx                /* downwards: see disk_setup */
        leaq -1(%rbx), %rax
        testq %rbx, %rbx
        jnz 2f
        movq dnslots, %rax
        decq %rax
        incq dsweeps
2:      movq %rax, dvcur
        movq dgen_tab, %rax
        movq (%rax,%rbx,8), %r13
        testq %r13, %r13
        jnz 3f
        decq %r14
        jnz 1b
        jmp 9f                          /* nothing written yet */
3:      call disk_verify_slot
9:      popq %r14
        popq %r13
        popq %rbx
        ret

/* disk_verify_slot: read back slot rbx, which should hold generation r13
 * (READ DMA), and check all its sectors; a block that fails counts once in
 * dbad, dlast_bad_lba is its first bad sector and dlast_bad_disk its disk.
 * rbx, r13 preserved. */
disk_verify_slot:
        pushq %r12
        pushq %r15
        call disk_slot
        movq %rax, %r15                 /* disk */
        movl $SVC_DMA, %eax
        movl $ATA_READ_DMA, %edi
        movq dprd, %rsi
        addq $16, %rsi
        movq %r12, %rdx
        movl $DBLOCK_SECTORS, %ecx
        movq %r15, %r11
        hlt                             /* -> #GP -> gp_entry -> ide_dma */
        call disk_status
        jnz 9f
        addq $64, dverified_kib
        movq drbuf, %r11
        xorl %r8d, %r8d
4:      leaq (%r12,%r8), %rdi
        movq %r13, %rsi
        call disk_check_sector
        testl %eax, %eax
        jnz 5f
        addq $512, %r11
        incq %r8
        cmpq $DBLOCK_SECTORS, %r8
        jb 4b
        jmp 9f
5:      incq dbad
        movq %rdi, dlast_bad_lba
        movq %r15, dlast_bad_disk
9:      popq %r15
        popq %r12
        ret

/* disk_status: the result eax of a DMA service call.  ZF set if it
 * succeeded; else count it (derrors, dlast_err), stop the workload if there
 * is no drive, and clear ZF.  Clobbers rax. */
disk_status:
        testl $DERR_NO_DRIVE | 0x200 | 0x21, %eax  /* no drive, BM error, ERR, DF */
        jz 9f
        incq derrors
        movq %rax, dlast_err
        testl $DERR_NO_DRIVE, %eax
        jz 1f
        movq $0, dactive
1:      testl %esp, %esp                /* clear ZF (rsp is never 0) */
9:      ret

/* disk_fill_sector: the 512 bytes of sector rdi at generation rsi, at r10
 * (advanced by 512; rdi, rsi preserved).  Clobbers rax, rcx, rdx. */
disk_fill_sector:
        movq seed, %rdx
        call mix
        movq %rdi, (%r10)
        movq %rsi, 8(%r10)
        movabsq $DISK_MAGIC, %rcx
        xorq seed, %rcx
        movq %rcx, 16(%r10)
        movq %rax, 24(%r10)
        movabsq $K_STEP, %rdx
        leaq (%rax,%rdx,4), %rax
        addq $32, %r10
        movl $60, %ecx
1:      movq %rax, (%r10)
        addq %rdx, %rax
        addq $8, %r10
        decl %ecx
        jnz 1b
        ret

/* disk_check_sector: is the sector at r11 sector rdi at generation rsi?
 * eax = 0 yes, 1 no (rdi, rsi, r11 preserved).  Clobbers rax, rcx, rdx, r10. */
disk_check_sector:
        cmpq %rdi, (%r11)
        jne 8f
        cmpq %rsi, 8(%r11)
        jne 8f
        movabsq $DISK_MAGIC, %rcx
        xorq seed, %rcx
        cmpq %rcx, 16(%r11)
        jne 8f
        movq seed, %rdx
        call mix
        cmpq %rax, 24(%r11)
        jne 8f
        movabsq $K_STEP, %rdx
        leaq (%rax,%rdx,4), %rax
        leaq 32(%r11), %r10
        movl $60, %ecx
1:      cmpq %rax, (%r10)
        jne 8f
        addq %rdx, %rax
        addq $8, %r10
        decl %ecx
        jnz 1b
        xorl %eax, %eax
        ret
8:      movl $1, %eax
        ret
        .endif

/* mix: rax = mix(pfn = rdi, gen = rsi, seed = rdx); clobbers rcx */
mix:
        movabsq $MIX_A, %rax
        imulq %rdi, %rax
        movabsq $MIX_B, %rcx
        imulq %rsi, %rcx
        addq %rcx, %rax
        movabsq $MIX_C, %rcx
        imulq %rdx, %rcx
        addq %rcx, %rax
        movq %rax, %rcx
        shrq $30, %rcx
        xorq %rcx, %rax
        movabsq $MIX_M1, %rcx
        imulq %rcx, %rax
        movq %rax, %rcx
        shrq $27, %rcx
        xorq %rcx, %rax
        movabsq $MIX_M2, %rcx
        imulq %rcx, %rax
        movq %rax, %rcx
        shrq $31, %rcx
        xorq %rcx, %rax
        ret

/* write_page: region page r8 gets generation r9 (r8, r9 preserved).
 * Returns rdi = pfn.  Clobbers rax, rcx, rdx, rsi, r10. */
write_page:
        movq first_pfn, %rdi
        addq %r8, %rdi
        movq %rdi, %r10
        shlq $12, %r10
        movq %r9, %rsi
        movq seed, %rdx
        call mix
        movq %rdi, (%r10)
        movq %r9, 8(%r10)
        movabsq $PAGE_MAGIC, %rcx
        xorq seed, %rcx
        movq %rcx, 16(%r10)
        movq %rax, 24(%r10)
        addq $32, %r10
        cmpq $0, zip
        jne 3f
        movabsq $K_STEP, %rdx
        leaq (%rax,%rdx,4), %rax
        movl $127, %ecx
1:      movq %rax, (%r10)
        addq %rdx, %rax
        movq %rax, 8(%r10)
        addq %rdx, %rax
        movq %rax, 16(%r10)
        addq %rdx, %rax
        movq %rax, 24(%r10)
        addq %rdx, %rax
        addq $32, %r10
        decl %ecx
        jnz 1b
        ret
        /* zip body: q[4..7] = Z[4..7], then 63 copies of Z[0..7] */
3:      .irp k, 4, 5, 6, 7
        movq zip_body + 8 * \k, %rax
        movq %rax, 8 * (\k - 4)(%r10)
        .endr
        addq $32, %r10
        movl $63, %ecx
4:      .irp k, 0, 1, 2, 3, 4, 5, 6, 7
        movq zip_body + 8 * \k, %rax
        movq %rax, 8 * \k(%r10)
        .endr
        addq $64, %r10
        decl %ecx
        jnz 4b
        ret

/* verify_page: check region page r8 against expected generation r9 (r8, r9
 * preserved).  Returns eax = 0 good / 1 bad, rdx = q[3] as read, rdi = pfn.
 * Clobbers rcx, rsi, r10, r11. */
verify_page:
        movq first_pfn, %rdi
        addq %r8, %rdi
        movq %rdi, %r11
        shlq $12, %r11
        cmpq %rdi, (%r11)
        jne 9f
        cmpq %r9, 8(%r11)
        jne 9f
        movabsq $PAGE_MAGIC, %rcx
        xorq seed, %rcx
        cmpq %rcx, 16(%r11)
        jne 9f
        movq %r9, %rsi
        movq seed, %rdx
        call mix
        cmpq %rax, 24(%r11)
        jne 9f
        leaq 32(%r11), %r10
        cmpq $0, zip
        jne 5f
        movabsq $K_STEP, %rdx
        leaq (%rax,%rdx,4), %rax
        movl $127, %ecx
1:      cmpq %rax, (%r10)
        jne 9f
        addq %rdx, %rax
        cmpq %rax, 8(%r10)
        jne 9f
        addq %rdx, %rax
        cmpq %rax, 16(%r10)
        jne 9f
        addq %rdx, %rax
        cmpq %rax, 24(%r10)
        jne 9f
        addq %rdx, %rax
        addq $32, %r10
        decl %ecx
        jnz 1b
8:      movq 24(%r11), %rdx
        xorl %eax, %eax
        ret
9:      movq 24(%r11), %rdx
        movl $1, %eax
        ret
        /* zip body, as write_page lays it out */
5:      .irp k, 4, 5, 6, 7
        movq zip_body + 8 * \k, %rax
        cmpq %rax, 8 * (\k - 4)(%r10)
        jne 9b
        .endr
        addq $32, %r10
        movl $63, %ecx
6:      .irp k, 0, 1, 2, 3, 4, 5, 6, 7
        movq zip_body + 8 * \k, %rax
        cmpq %rax, 8 * \k(%r10)
        jne 9b
        .endr
        addq $64, %r10
        decl %ecx
        jnz 6b
        jmp 8b

/* report: one status line; rbx = current TSC (preserved) */
report:
        incq counter
        movq $0, linelen
        movq $s_counter, %rsi
        movq counter, %rax
        call put_kv
        movq $s_gen, %rsi
        movq gen_total, %rax
        call put_kv
        movq $s_dirtied, %rsi
        movq gen_total, %rax
        shrq $8, %rax
        call put_kv
        movq $s_verified, %rsi
        movq verified, %rax
        call put_kv
        movq $s_bad, %rsi
        movq bad, %rax
        call put_kv
        movq $s_sum, %rsi
        call puts
        movq sum, %rax
        call puthex
        movq $s_mem, %rsi
        call put_mem_mib
        movq $s_ms, %rsi
        movq %rbx, %rax
        subq tsc_boot, %rax
        movl $1000, %ecx
        mulq %rcx
        divq tsc_hz
        call put_kv
        movq $s_sweeps, %rsi
        movq sweeps, %rax
        call put_kv
        movq $s_lastbad, %rsi
        movq last_bad, %rax
        call put_kv
        .ifdef FERRY_DISK
        movq $s_diskw, %rsi
        movq disk_writes, %rax
        call put_kv
        movq $s_diske, %rsi
        movq disk_errors, %rax
        call put_kv
        movq $s_disklast, %rsi
        movq disk_last_err, %rax
        call put_kv
        .irp f, dwritten_kib, dverified_kib, dbad, dlast_bad_lba, dlast_bad_disk, dsweeps, derrors, dlast_err
        movq $s_\f, %rsi
        movq \f, %rax
        call put_kv
        .endr
        .endif
        jmp line_flush

print_boot:
        movq $0, linelen
        movq $s_boot, %rsi
        call put_mem_mib
        movq $s_wss, %rsi
        movq wss_mib, %rax
        call put_kv
        movq $s_rate, %rsi
        movq rate_mib, %rax
        call put_kv
        movq $s_report, %rsi
        movq report_ms, %rax
        call put_kv
        movq $s_seed, %rsi
        movq seed, %rax
        call put_kv
        movq $s_tsckhz, %rsi
        movq tsc_hz, %rax
        xorl %edx, %edx
        movl $1000, %ecx
        divq %rcx
        call put_kv
        movq $s_tscsrc, %rsi
        call puts
        movq tsc_src_name, %rsi
        call puts
        movq $s_tscerr, %rsi
        movq tsc_err_ppm, %rax
        call put_kv
        movq $s_firstpfn, %rsi
        movq first_pfn, %rax
        call put_kv
        movq $s_pages, %rsi
        movq npages, %rax
        call put_kv
        movq $s_wsspages, %rsi
        movq wss_pages, %rax
        call put_kv
        movq $s_zip, %rsi
        movq zip, %rax
        call put_kv
        .ifdef FERRY_DISK
        movq $s_disk, %rsi
        movq disk_every, %rax
        call put_kv
        .irp f, dwrite_kib, dverify_kib, dsize_mib, ddisks, dbmide
        movq $s_\f, %rsi
        movq \f, %rax
        call put_kv
        .endr
        movq $s_dlba, %rsi
        movq $DREGION_LBA, %rax
        call put_kv
        .endif
        jmp line_flush

/* parse_cmdline: key=value tokens from the multiboot command line */
parse_cmdline:
        pushq %rbx
        movl mbi_ptr, %ebx
        cmpl $MB_BOOT_MAGIC, mb_magic
        jne 9f
        testl $4, (%rbx)
        jz 9f
        movl 16(%rbx), %esi
        testl %esi, %esi
        jz 9f
1:      movzbl (%rsi), %eax             /* skip blanks */
        testl %eax, %eax
        jz 8f
        cmpb $0x20, %al
        ja 2f
        incq %rsi
        jmp 1b
2:      movq $keytab, %rbx              /* token: look for a known key= */
3:      movq (%rbx), %rdi
        testq %rdi, %rdi
        jz 5f
        call match_key
        testl %eax, %eax
        jnz 4f
        addq $16, %rbx
        jmp 3b
4:      movq %rdx, %rsi
        call parse_num
        movq 8(%rbx), %rdi
        movq %rax, (%rdi)
5:      movzbl (%rsi), %eax             /* skip the rest of the token */
        testl %eax, %eax
        jz 8f
        cmpb $0x20, %al
        jbe 1b
        incq %rsi
        jmp 5b
8:      leaq 1(%rsi), %rax
        movq %rax, cmdline_end
9:      popq %rbx
        ret

/* match_key: does the token at rsi start with the string at rdi?
 * eax = 1 and rdx = position after it if so, else eax = 0.  Clobbers rcx, rdi. */
match_key:
        movq %rsi, %rdx
1:      movzbl (%rdi), %ecx
        testl %ecx, %ecx
        jz 2f
        cmpb %cl, (%rdx)
        jne 3f
        incq %rdi
        incq %rdx
        jmp 1b
2:      movl $1, %eax
        ret
3:      xorl %eax, %eax
        ret

/* parse_num: decimal or 0x-hex number at rsi -> rax, rsi advanced.
 * Clobbers rcx, rdx. */
parse_num:
        xorl %eax, %eax
        cmpb $0x30, (%rsi)              /* '0' */
        jne 2f
        movzbl 1(%rsi), %ecx
        orl $0x20, %ecx
        cmpl $0x78, %ecx                /* 'x' */
        jne 2f
        addq $2, %rsi
1:      movzbl (%rsi), %ecx
        leal -0x30(%rcx), %edx
        cmpl $9, %edx
        jbe 11f
        orl $0x20, %ecx
        leal -0x61(%rcx), %edx          /* 'a' */
        cmpl $5, %edx
        ja 3f
        addl $10, %edx
11:     shlq $4, %rax
        addq %rdx, %rax
        incq %rsi
        jmp 1b
2:      movzbl (%rsi), %ecx
        subl $0x30, %ecx
        cmpl $9, %ecx
        ja 3f
        imulq $10, %rax, %rax
        addq %rcx, %rax
        incq %rsi
        jmp 2b
3:      ret

/* setup_memory: RAM size, test region, working set, report period */
setup_memory:
        pushq %rbx
        movq $0x4000000, %rax           /* no memory info: 64 MiB */
        movl mbi_ptr, %ebx
        cmpl $MB_BOOT_MAGIC, mb_magic
        jne 1f
        testl $1, (%rbx)
        jz 1f
        movl 8(%rbx), %eax              /* mem_upper KiB */
        shlq $10, %rax
        addq $0x100000, %rax
1:      movq map_2m_pages, %rcx         /* never beyond what ring 0 mapped */
        shlq $21, %rcx
        cmpq %rcx, %rax
        jbe 2f
        movq %rcx, %rax
2:      andq $-4096, %rax
        movq %rax, ram_end
        movq $_kernel_end, %rcx         /* region starts after kernel and cmdline */
        movq cmdline_end, %rdx
        cmpq %rcx, %rdx
        jbe 3f
        movq %rdx, %rcx
3:      addq $4095, %rcx
        andq $-4096, %rcx
        .ifdef FERRY_DISK
        call disk_reserve
        .endif
        movq %rcx, region_start
        shrq $12, %rcx
        movq %rcx, first_pfn
        shrq $12, %rax
        xorl %edx, %edx
        subq %rcx, %rax
        cmovbq %rdx, %rax               /* no room: 0 pages */
        movq %rax, npages
        movq wss_mib, %rcx
        shlq $8, %rcx
        cmpq %rax, %rcx
        jbe 4f
        movq %rax, %rcx
4:      movq %rcx, wss_pages
        cmpq $0, report_ms
        jne 5f
        movq $200, report_ms
5:      cmpq $10, report_ms
        jae 6f
        movq $10, report_ms
6:      popq %rbx
        ret

/* setup_zip: zip = 0 or 1 (any non-zero value means on, so the boot line
 * shows what the pages are); the zip-mode body table Z[0..7] (see the
 * header).  Filled whatever the mode: it costs 8 mix calls. */
setup_zip:
        cmpq $0, zip
        je 1f
        movq $1, zip
1:      xorl %edi, %edi
2:      movq $-1, %rsi                  /* generation 2^64 - 1: never written */
        movq seed, %rdx
        call mix
        movq %rax, zip_body(,%rdi,8)
        incq %rdi
        cmpq $8, %rdi
        jb 2b
        ret

/* calibrate_tsc: tsc_hz from CPUID 0x40000010 or the PIT; derived periods */
calibrate_tsc:
        pushq %rbx
        movl $1, %eax
        xorl %ecx, %ecx
        cpuid
        btl $31, %ecx                   /* hypervisor present? */
        jnc 2f
        movl $0x40000000, %eax
        xorl %ecx, %ecx
        cpuid
        cmpl $0x40000010, %eax
        jb 2f
        cmpl $0x400000ff, %eax
        ja 2f
        movl $0x40000010, %eax
        xorl %ecx, %ecx
        cpuid
        testl %eax, %eax
        jz 2f
        movl %eax, %eax
        imulq $1000, %rax, %rax
        movq %rax, tsc_hz
        movq $s_src_cpuid, tsc_src_name
        jmp 5f
2:      movq $-1, tsc_err_ppm           /* up to PIT_ATTEMPTS measurements in */
        xorl %ebx, %ebx                 /* ring 0; keep the most precise one */
3:      movl $SVC_PIT, %eax
        hlt
        testl %eax, %eax
        jz 14f
        movq cal_tsc, %rcx
        testq %rcx, %rcx
        jz 14f
        movq cal_unc, %rax              /* uncertainty in ppm */
        movl $1000000, %edx
        mulq %rdx
        divq %rcx
        cmpq tsc_err_ppm, %rax
        jae 14f
        movq %rax, tsc_err_ppm
        movq cal_tsc, %rax
        movl $PIT_HZ, %ecx
        mulq %rcx
        divq cal_pit
        movq %rax, cal_best_hz
14:     incl %ebx
        cmpq $PIT_GOOD_PPM, tsc_err_ppm
        jbe 15f
        cmpl $PIT_ATTEMPTS, %ebx
        jb 3b
15:     cmpq $-1, tsc_err_ppm
        je 4f
        movq cal_best_hz, %rax
        movq $10000000, %rcx            /* sanity: 10 MHz .. 100 GHz */
        cmpq %rcx, %rax
        jb 4f
        movabsq $100000000000, %rcx
        cmpq %rcx, %rax
        ja 4f
        movq %rax, tsc_hz
        movq $s_src_pit, tsc_src_name
        jmp 5f
4:      movq $1000000000, tsc_hz        /* keep going with a guess */
        movq $s_src_default, tsc_src_name
5:      movq tsc_hz, %rax               /* report period */
        mulq report_ms
        movl $1000, %ecx
        divq %rcx
        movq %rax, report_ticks
        movq tsc_hz, %rax               /* serial wait budget: 2 ms per byte */
        xorl %edx, %edx
        movl $500, %ecx
        divq %rcx
        movq %rax, serial_budget
        movq tsc_hz, %rax               /* catch-up limit: 50 ms */
        xorl %edx, %edx
        movl $20, %ecx
        divq %rcx
        movq %rax, catchup_ticks
        movq rate_mib, %rcx             /* ticks per PACED_WRITE_PAGES pages */
        testq %rcx, %rcx
        jz 6f
        shlq $8, %rcx                   /* pages per second */
        movq tsc_hz, %rax
        movl $PACED_WRITE_PAGES, %edx
        mulq %rdx
        divq %rcx
        testq %rax, %rax
        jnz 7f
        incq %rax
7:      movq %rax, batch_ticks
6:      popq %rbx
        ret

/* rdtsc64: rax = TSC; clobbers rdx */
rdtsc64:
        rdtsc
        shlq $32, %rdx
        orq %rdx, %rax
        ret

/* ---- COM1 ------------------------------------------------------------ */
/* Text is built in linebuf by ring-3 (or fault-handler) code with putc/puts/
 * putdec/puthex and sent by line_flush, one ring-0 service call per line:
 * ring 3 cannot do port I/O here (the hypervisor drops IOPL for ring 3), and
 * one trap per line is cheap while ring-0 code is slow. */

/* serial_init (ring 0): 115200 8N1, FIFO, no interrupts */
serial_init:
        movw $COM1 + 1, %dx
        xorl %eax, %eax
        outb %al, %dx                   /* IER: no interrupts */
        movw $COM1 + 3, %dx
        movb $0x80, %al
        outb %al, %dx                   /* LCR: DLAB */
        movw $COM1, %dx
        movb $1, %al
        outb %al, %dx                   /* divisor 1: 115200 baud */
        movw $COM1 + 1, %dx
        xorl %eax, %eax
        outb %al, %dx
        movw $COM1 + 3, %dx
        movb $0x03, %al
        outb %al, %dx                   /* 8N1 */
        movw $COM1 + 2, %dx
        movb $0xc7, %al
        outb %al, %dx                   /* FIFO on, cleared, 14-byte threshold */
        movw $COM1 + 4, %dx
        movb $0x03, %al
        outb %al, %dx                   /* DTR, RTS */
        movw $COM1 + 2, %dx
        inb %dx, %al                    /* IIR bits 7:6 = 11: 16550A FIFO */
        andb $0xc0, %al
        cmpb $0xc0, %al
        jne 1f
        movq $16, fifo_size
1:      ret

/* serial_write (ring 0): rdx bytes at rsi.  Polls LSR for THRE (then the
 * whole FIFO may be filled) for at most serial_budget TSC ticks per wait; on
 * time-out the rest of the line is dropped, so a host that stops reading
 * cannot stall the guest.  Clobbers rax, rcx, rdx, rsi, r10, r11. */
serial_write:
        movq %rdx, %rcx
        testq %rcx, %rcx
        jz 9f
        xorl %r11d, %r11d               /* bytes the FIFO still takes */
1:      testq %r11, %r11
        jnz 3f
        movw $COM1 + 5, %dx
        inb %dx, %al
        testb $0x20, %al
        jnz 2f
        call rdtsc64
        addq serial_budget, %rax
        movq %rax, %r10
4:      pause
        movw $COM1 + 5, %dx
        inb %dx, %al
        testb $0x20, %al
        jnz 2f
        call rdtsc64
        cmpq %r10, %rax
        jb 4b
        ret
2:      movq fifo_size, %r11
3:      decq %r11
        movw $COM1, %dx
        movb (%rsi), %al
        outb %al, %dx
        incq %rsi
        decq %rcx
        jnz 1b
9:      ret

/* line_flush: append CR LF to linebuf and send it (directly in ring 0,
 * through the service call in ring 3).  Clobbers like a function call. */
line_flush:
        movq $s_crlf, %rsi
        call puts
        movq $linebuf, %rsi
        movq linelen, %rdx
        movq $0, linelen
        movw %cs, %ax
        testb $3, %al
        jz serial_write
        movl $SVC_WRITE, %eax
        hlt                             /* -> #GP -> gp_entry -> serial_write */
        ret

/* putc: append al to linebuf (silently truncated).  Clobbers rdx. */
putc:
        movq linelen, %rdx
        cmpq $LINEBUF_SIZE, %rdx
        jae 1f
        movb %al, linebuf(%rdx)
        incq %rdx
        movq %rdx, linelen
1:      ret

/* puts: NUL-terminated string at rsi.  Clobbers rax, rdx, rsi, r10, r11. */
puts:
1:      movzbl (%rsi), %eax
        testl %eax, %eax
        jz 2f
        call putc
        incq %rsi
        jmp 1b
2:      ret

/* putdec: rax unsigned decimal.  Clobbers rax, rcx, rdx, rsi, r10, r11. */
putdec:
        movq $numbuf_end, %rsi
        movb $0, (%rsi)
        movl $10, %ecx
1:      xorl %edx, %edx
        divq %rcx
        addb $0x30, %dl
        decq %rsi
        movb %dl, (%rsi)
        testq %rax, %rax
        jnz 1b
        jmp puts

/* puthex: rax as 16 hex digits.  Clobbers rax, rcx, rdx, r8, r10, r11. */
puthex:
        movq %rax, %r8
        movl $16, %ecx
1:      rolq $4, %r8
        movl %r8d, %eax
        andl $15, %eax
        movzbl hexdigits(%rax), %eax
        call putc
        decl %ecx
        jnz 1b
        ret

/* put_mem_mib: string at rsi, then RAM size in MiB, rounded up (the BIOS
 * keeps the last few hundred KiB below mem_upper's end for itself). */
put_mem_mib:
        movq ram_end, %rax
        addq $0xfffff, %rax
        shrq $20, %rax
        jmp put_kv

/* put_kv: string at rsi, then rax in decimal. */
put_kv:
        pushq %rax
        call puts
        popq %rax
        jmp putdec

/* ------------------------------------------------------------------------ */
        .section .rodata
hexdigits:      .ascii "0123456789abcdef"
s_boot:         .asciz "FERRY-GUEST boot mem_mib="
s_wss:          .asciz " wss="
s_rate:         .asciz " rate="
s_report:       .asciz " report="
s_seed:         .asciz " seed="
s_tsckhz:       .asciz " tsc_khz="
s_tscsrc:       .asciz " tsc_src="
s_tscerr:       .asciz " tsc_err_ppm="
s_firstpfn:     .asciz " first_pfn="
s_pages:        .asciz " pages="
s_wsspages:     .asciz " wss_pages="
s_zip:          .asciz " zip="
s_src_pit:      .asciz "pit"
s_src_cpuid:    .asciz "cpuid"
s_src_default:  .asciz "default"
s_counter:      .asciz "FERRY-GUEST counter="
s_gen:          .asciz " gen="
s_dirtied:      .asciz " dirtied_mib="
s_verified:     .asciz " verified="
s_bad:          .asciz " bad="
s_sum:          .asciz " sum="
s_mem:          .asciz " mem_mib="
s_ms:           .asciz " ms="
s_sweeps:       .asciz " sweeps="
s_lastbad:      .asciz " last_bad="
s_crlf:         .asciz "\r\n"
s_fault:        .asciz "FERRY-GUEST fault vec="
s_err:          .asciz " err="
s_rip:          .asciz " rip="
s_cr2:          .asciz " cr2="
s_cs:           .asciz " cs="
s_rflags:       .asciz " rflags="
s_nomem:        .asciz "FERRY-GUEST fault reason=no-memory"
k_wss:          .asciz "wss="
k_rate:         .asciz "rate="
k_report:       .asciz "report="
k_seed:         .asciz "seed="
k_crash:        .asciz "crash="
k_zip:          .asciz "zip="
        .ifdef FERRY_DISK
k_disk:         .asciz "disk="
s_disk:         .asciz " disk="
s_diskw:        .asciz " disk_writes="
s_diske:        .asciz " disk_errors="
s_disklast:     .asciz " disk_last_err="
k_dwrite:       .asciz "dwrite="
k_dverify:      .asciz "dverify="
k_dsize:        .asciz "dsize="
k_ddisks:       .asciz "ddisks="
s_ddisks:       .asciz " ddisks="
s_dlast_bad_disk: .asciz " dlast_bad_disk="
s_dwrite_kib:   .asciz " dwrite="
s_dverify_kib:  .asciz " dverify="
s_dsize_mib:    .asciz " dsize="
s_dbmide:       .asciz " dbmide="
s_dlba:         .asciz " dlba="
s_dwritten_kib: .asciz " dwritten_kib="
s_dverified_kib: .asciz " dverified_kib="
s_dbad:         .asciz " dbad="
s_dlast_bad_lba: .asciz " dlast_bad_lba="
s_dsweeps:      .asciz " dsweeps="
s_derrors:      .asciz " derrors="
s_dlast_err:    .asciz " dlast_err="
        .endif

        .balign 8
keytab:
        .quad k_wss, wss_mib
        .quad k_rate, rate_mib
        .quad k_report, report_ms
        .quad k_seed, seed
        .quad k_crash, crash
        .quad k_zip, zip
        .ifdef FERRY_DISK
        .quad k_disk, disk_every
        .quad k_dwrite, dwrite_kib
        .quad k_dverify, dverify_kib
        .quad k_dsize, dsize_mib
        .quad k_ddisks, ddisks
        .endif
        .quad 0, 0

/* ------------------------------------------------------------------------ */
/* All mutable state, including page tables and stacks, is file-backed
 * (zeros in the image) so nothing depends on the loader clearing .bss.      */
        .data
        .balign 4096
pml4:           .fill 4096, 1, 0
pdpt:           .fill 4096, 1, 0
pd:             .fill 4 * 4096, 1, 0    /* 4 x 512 x 2 MiB = 4 GiB */

stack0:         .fill 8192, 1, 0
stack0_top:
stack3:         .fill 16384, 1, 0
stack3_top:

        .balign 16
gdt:
        .quad 0
        .quad 0x00AF9A000000FFFF        /* 0x08 kernel code, 64-bit */
        .quad 0x00CF92000000FFFF        /* 0x10 kernel data */
        .quad 0x00CFF2000000FFFF        /* 0x18 user data, DPL 3 */
        .quad 0x00AFFA000000FFFF        /* 0x20 user code, 64-bit, DPL 3 */
gdt_tss:
        .quad 0x0000890000000067        /* 0x28 TSS (base set at run time) */
        .quad 0
gdt_end:

        .balign 16
gdt_ptr:        .word gdt_end - gdt - 1
                .quad gdt
        .balign 16
idt_ptr:        .word 32 * 16 - 1
                .quad idt
        .balign 16
idt:            .fill 32 * 16, 1, 0
        .balign 16
tss:            .fill 102, 1, 0
                .word 104               /* I/O bitmap offset: none */

        .balign 8
/* multiboot */
mb_magic:       .quad 0
mbi_ptr:        .quad 0
map_2m_pages:   .quad 0
cmdline_end:    .quad 0
/* parameters */
wss_mib:        .quad 16
rate_mib:       .quad 0
report_ms:      .quad 200
seed:           .quad 1
crash:          .quad 0
zip:            .quad 0                 /* 1: compressible pages (zip mode) */
zip_body:       .fill 8, 8, 0           /* zip mode: Z[0..7], the page body */
/* memory */
ram_end:        .quad 0
region_start:   .quad 0
first_pfn:      .quad 0
npages:         .quad 0
wss_pages:      .quad 0
/* time */
tsc_hz:         .quad 0
tsc_src_name:   .quad s_src_default
tsc_err_ppm:    .quad 0                 /* calibration uncertainty (0 for cpuid) */
tsc_boot:       .quad 0
report_ticks:   .quad 0
next_report:    .quad 0
batch_ticks:    .quad 0
next_write:     .quad 0
catchup_ticks:  .quad 0
/* rewriting: gen_total = wround * wss_pages + wcur */
gen_total:      .quad 0
wcur:           .quad 0
wround:         .quad 0
/* verification */
vcur:           .quad 0
verified:       .quad 0
bad:            .quad 0
last_bad:       .quad 0
sweep_acc:      .quad 0
sum:            .quad 0
sweeps:         .quad 0
counter:        .quad 0
/* PIT calibration */
cal_c0:         .quad 0
cal_prev:       .quad 0
cal_ts:         .quad 0
cal_ws:         .quad 0
cal_cs:         .quad 0
cal_te:         .quad 0
cal_we:         .quad 0
cal_ce:         .quad 0
cal_tsc:        .quad 0
cal_pit:        .quad 0
cal_unc:        .quad 0
cal_best_hz:    .quad 0
/* serial */
serial_budget:  .quad 50000000          /* until the TSC is calibrated */
fifo_size:      .quad 1
linelen:        .quad 0
linebuf:        .fill LINEBUF_SIZE, 1, 0
numbuf:         .fill 31, 1, 0
numbuf_end:     .byte 0
        .ifdef FERRY_DISK
        .balign 8
/* disk variant */
disk_every:     .quad 0
disk_left:      .quad 0
disk_lba:       .quad 0
disk_writes:    .quad 0
disk_errors:    .quad 0
disk_last_err:  .quad 0
/* dwrite workload (see the header) */
dwrite_kib:     .quad 0                 /* write rate, KiB/s; 0 = off */
dverify_kib:    .quad -1                /* sweep rate, KiB/s; -1 = dwrite / 4; 0 = off */
dsize_mib:      .quad 16
dnblocks:       .quad 0                 /* blocks per disk */
ddisks:         .quad 1                 /* 1, or 2: primary and secondary master */
dnslots:        .quad 0                 /* dnblocks * ddisks */
dbmide:         .quad 0                 /* bus-master I/O base (BAR4) */
dactive:        .quad 0
dwbuf:          .quad 0
drbuf:          .quad 0
dprd:           .quad 0
dgen_tab:       .quad 0                 /* generation last written, per block */
dwrite_ticks:   .quad 0
dverify_ticks:  .quad 0
next_dwrite:    .quad 0
next_dverify:   .quad 0
dwcur:          .quad 0
dvcur:          .quad 0
dseq:           .quad 0
dwritten_kib:   .quad 0
dverified_kib:  .quad 0
dbad:           .quad 0
dlast_bad_lba:  .quad 0
dlast_bad_disk: .quad 0
dsweeps:        .quad 0
derrors:        .quad 0
dlast_err:      .quad 0
        .balign 16
disk_buf:       .fill 512, 1, 0
        .endif

        .section .note.GNU-stack, "", @progbits
