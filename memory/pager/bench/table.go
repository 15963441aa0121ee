package bench

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// PrintTable writes r as the table docs/memory.md shows.
func PrintTable(w io.Writer, r *Result) {
	fmt.Fprintf(w, "remote 4 KiB fault (cluster pool, TLS):     p50 %.1f us, p99 %.1f us\n", r.FaultP50us, r.FaultP99us)
	fmt.Fprintf(w, "  of which the pool's Load of the page:     p50 %.1f us, p99 %.1f us\n", r.LoadP50us, r.LoadP99us)
	fmt.Fprintf(w, "raw 4 KiB TCP round trip, same run:        p50 %.1f us, p99 %.1f us\n", r.RTTP50us, r.RTTP99us)
	fmt.Fprintf(w, "remote fault / raw round trip (p50):       %.2fx\n", r.FaultVsRTT)
	fmt.Fprintf(w, "\nworkloads, %d MiB footprint; swap baseline: %s\n", r.SizeMiB, r.Swap)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKLOAD\tLOCAL\tONEBOX\tUNIT\tvs ALL-LOCAL\tvs PLAIN\tSWAP\tONEBOX/SWAP\tEVICTED")
	for _, row := range r.Rows {
		swap, vs := "-", "-"
		if row.Swap > 0 {
			swap, vs = fmt.Sprintf("%.4g", row.Swap), fmt.Sprintf("%.2fx", row.VsSwap)
		}
		fmt.Fprintf(tw, "%s\t%d%%\t%.4g\t%s\t%.2fx\t%.2fx\t%s\t%s\t%d\n", row.Workload, row.LocalPct, row.Onebox, row.Unit,
			row.VsAllLocal, row.VsPlain, swap, vs, row.Evicted)
	}
	tw.Flush()
}
