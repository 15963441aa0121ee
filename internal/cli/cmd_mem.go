package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/memory/poolbench"
)

// memCommands are the memory pool verbs (issue 3): mem.
func memCommands() []*cobra.Command {
	c := &cobra.Command{
		Use:   "mem",
		Short: "Show the cluster memory pool: capacity, use, replicas, per-node usage, faults",
		Long: `mem shows the cluster memory pool: the RAM each node donates (--donate-memory),
what other nodes' pages use of it, the reservations of running programs, how
many copies of each page are kept (--memory-replicas), the pages that have
fewer copies than that (a node holding copies failed and re-replication is
still running) or none, and the memory expansion counters of each node's
pager. It asks every live member; a member that does not answer is shown with
its error and the command exits 1.`,
		Example: `  onebox mem
  onebox mem -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, err := getAndPrint(cmd, api.PathMem, func(w io.Writer, r api.MemResponse) error {
				printMem(w, r)
				return nil
			})
			if err != nil {
				return err
			}
			var bad []string
			for _, n := range r.Nodes {
				if n.Error != "" {
					bad = append(bad, n.Name)
				}
			}
			if len(bad) > 0 {
				return fmt.Errorf("no answer from %s: their part of the pool is not shown", strings.Join(bad, ", "))
			}
			return nil
		},
	}
	addOutputFlag(c)
	c.AddCommand(newMemProbeCmd())
	return []*cobra.Command{c}
}

func printMem(out io.Writer, r api.MemResponse) {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(w, "POOL\tcapacity %s\tused %s\treserved %s\treplicas %d\tunder-replicated %d pages\tlost %d pages\n",
		size(r.CapacityBytes), size(r.UsedBytes), size(r.ReservedBytes), r.Replicas, r.UnderReplicatedPages, r.LostPages)
	w.Flush()
	fmt.Fprintln(out)
	w = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tSTATUS\tDONATED\tUSED\tRESERVED\tOWNED\tUNDER-REPL\tLOST\tREPAIRED\tPROGRAMS\tFAULTS\tREMOTE\tEVICTIONS")
	for _, n := range r.Nodes {
		if n.Error != "" {
			fmt.Fprintf(w, "%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t(%s)\n", n.Name, n.Status, n.Error)
			continue
		}
		if n.Status != "alive" && n.Status != "suspect" {
			fmt.Fprintf(w, "%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\n", n.Name, n.Status)
			continue
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%d\t%d\t%d\t%d\n", n.Name, n.Status,
			size(n.DonatedBytes), size(n.UsedBytes), size(n.ReservedBytes), size(n.OwnedPages*4096),
			n.UnderReplicatedPages, n.LostPages, size(n.RepairedBytes),
			n.Pager.Programs, n.Pager.Faults, n.Pager.RemoteFaults, n.Pager.Evictions)
	}
	w.Flush()
}

func newMemProbeCmd() *cobra.Command {
	var probe api.MemProbe
	sz := agent.ByteSize(16 << 20)
	c := &cobra.Command{
		Use:   "probe store|verify|drop|reserve|release",
		Short: "Write a known pattern into the pool through this agent, read it back, drop it",
		Long: `probe checks the memory pool end to end through the local agent: 'store' writes
--size bytes of a pattern derived from --seed into the pool (as a program's
pages would be, in --memory-replicas copies on other nodes), 'verify' reads
them back and compares every byte, 'drop' forgets them; 'reserve' and
'release' account --size bytes of capacity as a program's allocation would.
Probes are named (--name), so several can coexist. Exit status 1 when the
pool refuses or a byte differs.`,
		Example: `  onebox mem probe store --size 64MiB
  onebox mem probe verify --size 64MiB
  onebox mem probe drop`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			switch args[0] {
			case "store", "verify", "drop", "reserve", "release":
			default:
				return usagef("unknown probe %q: use store, verify, drop, reserve or release", args[0])
			}
			if sz <= 0 || sz%4096 != 0 {
				return usagef("--size %v: want a positive multiple of 4KiB", sz)
			}
			probe.Op, probe.Size = args[0], uint64(sz)
			if probe.Op == "drop" {
				probe.Size = 0
			}
			var res api.MemProbeResult
			if err := postLocal(cmd, api.PathMemProbe, probe, &res); err != nil {
				return err
			}
			if format == "json" {
				if err := writeJSON(cmd.OutOrStdout(), res); err != nil {
					return err
				}
			} else if res.Error == "" {
				rate := ""
				if res.Bytes > 0 && res.Seconds > 0 && (res.Op == "store" || res.Op == "verify") {
					rate = fmt.Sprintf(" (%.0f MB/s)", float64(res.Bytes)/res.Seconds/1e6)
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%s %s of %s: ok in %.3fs%s\n", res.Op, size(res.Bytes), res.Owner, res.Seconds, rate)
			}
			if res.Full {
				return fmt.Errorf("the memory pool is full: %s (donate more memory with --donate-memory, or add nodes)", res.Error)
			}
			if res.Error != "" {
				return errors.New(res.Error)
			}
			return nil
		},
	}
	addOutputFlag(c)
	c.Flags().Var(&sz, "size", "bytes to store, verify, reserve or release (a multiple of 4KiB)")
	c.Flags().Uint64Var(&probe.Seed, "seed", 1, "seed of the pattern")
	c.Flags().StringVar(&probe.Name, "name", "default", "probe name")
	return c
}

// postLocal sends a JSON request to the local agent's socket (probes are
// served there only) and decodes the answer.
func postLocal(cmd *cobra.Command, path string, body, v any) error {
	addr := agentAddress(cmd)
	sock, ok := strings.CutPrefix(addr, "unix://")
	if !ok {
		return usagef("this command talks to the local agent only: give --agent unix:///path/agent.sock (or --data-dir)")
	}
	hc := &http.Client{Timeout: 10 * time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}}}
	b, _ := json.Marshal(body)
	req, err := http.NewRequestWithContext(cmd.Context(), http.MethodPost, "http://agent"+path, bytes.NewReader(b))
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the onebox agent at %s: %w (is 'onebox agent' running?)", sock, err)
	}
	defer resp.Body.Close()
	rb, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var eb api.ErrorBody
		if json.Unmarshal(rb, &eb) == nil && eb.Error != "" {
			return fmt.Errorf("agent: %s", eb.Error)
		}
		return fmt.Errorf("agent: %s: HTTP %d", path, resp.StatusCode)
	}
	return json.Unmarshal(rb, v)
}

// memAgentFlags registers the agent's memory pool flags on f (values in
// cfg) and returns a func that copies the flags the user set into final.
func memAgentFlags(f *pflag.FlagSet, cfg *agent.Config) func(final *agent.Config) {
	f.IntVar(&cfg.MemoryReplicas, "memory-replicas", agent.DefaultMemoryReplicas, "copies of each memory pool page, on as many different nodes")
	return func(final *agent.Config) {
		if f.Changed("memory-replicas") {
			final.MemoryReplicas = cfg.MemoryReplicas
		}
	}
}

// poolBenchCommands are 'onebox bench' subcommands of the memory pool.
func poolBenchCommands() []*cobra.Command {
	var opts poolbench.Options
	c := &cobra.Command{
		Use:   "pool",
		Short: "Measure the memory pool's page protocol against raw TCP and TLS round trips",
		Long: `pool starts page servers in this process on loopback, each behind a fabric
port with real mutual TLS (a throwaway cluster CA), and measures in one run:

  tcp rtt      a 4 KiB request/response round trip over plain TCP (baseline)
  tls rtt      the same over TLS 1.3 (what the page protocol rides on)
  load 4KiB    one page loaded through the replicated pool (memory/cluster)
  store 4KiB   one page stored in 2 copies
  load/store   batches of 64 KiB and 2 MiB, one and several in flight (GB/s)
  repair       re-replication after a node holding copies is killed (GB/s)

It prints p50/p99 and ratios to the round trips measured in the same run.
Latencies move with the wake-up cost between the 2 vCPUs of a small VM: read
the ratios, not the absolute figures.`,
		Example: `  onebox bench pool
  onebox bench pool --repair-size 512MiB -o json`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			if opts.Rounds < 100 || opts.Rounds > 10_000_000 {
				return usagef("--rounds %d: want 100 to 10000000", opts.Rounds)
			}
			rs := uint64(repairSize)
			if rs < 1<<20 || rs > 8<<30 {
				return usagef("--repair-size: %v is out of range (1MiB to 8GiB)", repairSize)
			}
			opts.RepairBytes = rs
			opts.Log = cmd.ErrOrStderr()
			r, err := poolbench.Run(cmd.Context(), opts)
			if err != nil {
				return err
			}
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), r)
			}
			r.Print(cmd.OutOrStdout())
			return nil
		},
	}
	addOutputFlag(c)
	c.Flags().IntVar(&opts.Rounds, "rounds", 5000, "round trips per latency measure")
	c.Flags().Var(&repairSize, "repair-size", "bytes stored before a node is killed, for the repair rate")
	c.Flags().IntVar(&opts.Conns, "conns", 0, "connections per node for the throughput measures (0: compare 1 and 2)")
	return []*cobra.Command{c}
}

var repairSize = agent.ByteSize(256 << 20)
