package bench

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// PrintTable writes r as the table docs/memory.md shows.
func PrintTable(w io.Writer, r *Result) {
	fmt.Fprintf(w, "remote 4 KiB fault (cluster pool, TLS):     p50 %.1f us, p99 %.1f us, mean %.1f us\n", r.FaultP50us, r.FaultP99us, r.FaultMeanUs)
	fmt.Fprintf(w, "  in the pager (means): pool Load %.1f us, UFFDIO_COPY %.1f us, eviction %.1f us; the rest (%.1f us) is\n",
		r.PagerLoadMeanUs, r.PagerCopyMeanUs, r.PagerEvictUs, r.FaultMeanUs-r.PagerLoadMeanUs-r.PagerCopyMeanUs-r.PagerEvictUs)
	fmt.Fprintf(w, "  the kernel delivering the fault, the pager's loop and waking the faulting thread\n")
	fmt.Fprintf(w, "the same fault from a pool in memory:       p50 %.1f us (pager + kernel, no network)\n", r.LocalFaultP50us)
	fmt.Fprintf(w, "the pool's Load of one page alone:          p50 %.1f us, p99 %.1f us\n", r.LoadP50us, r.LoadP99us)
	fmt.Fprintf(w, "raw 4 KiB TCP round trip, same run:         p50 %.1f us, p99 %.1f us\n", r.RTTP50us, r.RTTP99us)
	fmt.Fprintf(w, "remote fault / raw round trip (p50):        %.2fx   (floor with this pool, (Load + fault from memory) / round trip: %.2fx)\n",
		r.FaultVsRTT, (r.LoadP50us+r.LocalFaultP50us)/r.RTTP50us)
	fmt.Fprintf(w, "bulk 1 MiB: raw TCP %.0f MB/s, the pool's Load %.0f MB/s using %.2f ms of CPU per MiB (%d vCPU left beside the workload)\n",
		r.RawBulkMBps, r.PoolBulkMBps, r.PoolCPUmsPerMiB, r.PoolCPUs)
	fmt.Fprintf(w, "\nworkloads, %d MiB footprint; swap baseline: %s\n", r.SizeMiB, r.Swap)
	fmt.Fprintf(w, "CEILING: the best vs ALL-LOCAL any pager could reach here (seq/scan: the non-local part of each pass at the pool's bulk rate\n"+
		"and CPU, overlapped with the program; rand: each miss one raw round trip); baselines: the faster of two runs\n")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKLOAD\tLOCAL\tONEBOX\tUNIT\tvs ALL-LOCAL\tCEILING\tvs PLAIN\tSWAP\tONEBOX/SWAP\tSWAP-INS\tSWAP PEAK MiB\tEVICTED")
	for _, row := range r.Rows {
		swap, vs, ins, peak := "-", "-", "-", "-"
		if row.Swap > 0 {
			swap, vs, ins = fmt.Sprintf("%.4g", row.Swap), fmt.Sprintf("%.2fx", row.VsSwap), fmt.Sprint(row.SwapIns)
			peak = fmt.Sprintf("%.0f", row.SwapPeakMiB)
		}
		fmt.Fprintf(tw, "%s\t%d%%\t%.4g\t%s\t%.2fx\t%.2fx\t%.2fx\t%s\t%s\t%s\t%s\t%d\n", row.Workload, row.LocalPct, row.Onebox, row.Unit,
			row.VsAllLocal, row.Ceiling, row.VsPlain, swap, vs, ins, peak, row.Evicted)
	}
	tw.Flush()
	fmt.Fprintf(w, "\ntimed part under the pager: faults, MiB from the pool, the pager's time (ms) and the CPU of the bench process\n"+
		"(pager, pool client and both page servers) against the part's duration; the workload itself takes one of the 2 vCPUs\n")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKLOAD\tLOCAL\tTIMED ms\tFAULTS\tPOOL MiB\tFAULT LOADS\tREADAHEAD LOADS\tUFFDIO_COPY\tEVICTION\tBENCH CPU ms")
	for _, row := range r.Rows {
		if row.LocalPct == 100 {
			continue
		}
		fmt.Fprintf(tw, "%s\t%d%%\t%.0f\t%d\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\n", row.Workload, row.LocalPct, row.TimedSec*1e3, row.Faults,
			row.PoolMiB, row.FaultLoadMs, row.AheadLoadMs, row.CopyMs, row.EvictMs, row.CPUms)
	}
	tw.Flush()
}
