package cli

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/pki"
	loadbal "github.com/onebox-project/onebox/proc/balance"
)

// balanceCommands are the balancing verbs (issue 4): drain, cordon,
// uncordon, and balance (the balancer's view).
func balanceCommands() []*cobra.Command {
	return []*cobra.Command{newDrainCmd(), newCordonCmd(true), newCordonCmd(false), newBalanceCmd()}
}

// balanceAgentFlags registers the agent's balancer flags on f (values in
// cfg) and returns a func that copies the flags the user set into final.
func balanceAgentFlags(f *pflag.FlagSet, cfg *agent.Config) func(final *agent.Config) {
	f.BoolVar(&cfg.NoBalance, "no-balance", false, "this agent never moves processes by itself (it still takes them from others, and drains)")
	f.Float64Var(&cfg.BalanceThreshold, "balance-threshold", loadbal.DefaultThreshold, "least difference of load per CPU (runnable threads of onebox processes per CPU) between two nodes for a move")
	f.DurationVar(&cfg.BalanceInterval, "balance-interval", loadbal.DefaultInterval, "time between the balancer's decisions")
	f.DurationVar(&cfg.BalanceCooldown, "balance-cooldown", loadbal.DefaultCooldown, "a process that arrived by migration, or whose move failed, stays at least this long")
	return func(final *agent.Config) {
		if f.Changed("no-balance") {
			final.NoBalance = cfg.NoBalance
		}
		if f.Changed("balance-threshold") {
			final.BalanceThreshold = cfg.BalanceThreshold
		}
		if f.Changed("balance-interval") {
			final.BalanceInterval = cfg.BalanceInterval
		}
		if f.Changed("balance-cooldown") {
			final.BalanceCooldown = cfg.BalanceCooldown
		}
	}
}

func newDrainCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "drain NODE",
		Short: "Move every process off a node and mark it unschedulable",
		Long: `drain marks NODE unschedulable (cordoned: 'onebox run --best' and the load
balancer skip it, 'onebox run --node NODE' is refused; the mark is kept on the
node, across restarts of its agent) and migrates every process running there to
the least loaded schedulable nodes, one at a time.

Processes that cannot move are listed with the reason, and the exit status is
then 1; they keep running on NODE. 'onebox uncordon NODE' makes it schedulable
again.`,
		Args: cobra.ExactArgs(1),
		RunE: runDrain,
	}
	c.Flags().Duration("timeout", agent.DefaultDrainTimeout, "give up on the processes not moved after this long")
	addOutputFlag(c)
	return c
}

func runDrain(cmd *cobra.Command, args []string) error {
	format, err := outputFormat(cmd)
	if err != nil {
		return err
	}
	node := args[0]
	if err := pki.ValidNodeName(node); err != nil {
		return usagef("%v", err)
	}
	timeout, _ := cmd.Flags().GetDuration("timeout")
	if timeout < time.Second || timeout > 24*time.Hour {
		return usagef("--timeout %v: want a duration between 1s and 24h", timeout)
	}
	var res agent.DrainResult
	q := url.Values{"node": {node}, "timeout": {timeout.String()}}
	if err := agentCall(cmd, http.MethodPost, "/v1/balance/drain?"+q.Encode(), timeout+30*time.Second, nil, &res); err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if format == "json" {
		if err := writeJSON(out, res); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(out, "Node %s is cordoned: it takes no new processes ('onebox uncordon %s' ends that).\n", res.Node, res.Node)
		if len(res.Moved)+len(res.Remaining) == 0 {
			fmt.Fprintf(out, "No process was running on %s.\n", res.Node)
		} else {
			w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
			fmt.Fprintln(w, "GID\tRESULT\tTO\tCOMMAND\tWHY")
			for _, p := range res.Moved {
				fmt.Fprintf(w, "%s\tmoved\t%s\t%s\t\n", p.GID, p.To, balCommand(p.Command))
			}
			for _, p := range res.Remaining {
				to := p.To
				if to == "" {
					to = "-"
				}
				fmt.Fprintf(w, "%s\tremains\t%s\t%s\t%s\n", p.GID, to, balCommand(p.Command), p.Error)
			}
			w.Flush()
		}
	}
	if n := len(res.Remaining); n > 0 {
		var parts []string
		for _, p := range res.Remaining {
			parts = append(parts, fmt.Sprintf("%s (%s): %s", p.GID, balCommand(p.Command), p.Error))
		}
		return fmt.Errorf("%d process(es) could not be moved off %s and keep running there: %s", n, res.Node, strings.Join(parts, "; "))
	}
	return nil
}

func newCordonCmd(on bool) *cobra.Command {
	verb, short, long := "cordon", "Mark a node unschedulable (no new or moved processes)",
		`cordon marks NODE unschedulable, as drain does, but moves nothing: 'onebox run
--best' and the load balancer skip it and 'onebox run --node NODE' is refused.
The mark is kept on the node, across restarts of its agent, and shown by
'onebox nodes'.`
	if !on {
		verb, short, long = "uncordon", "Make a drained or cordoned node schedulable again",
			`uncordon lifts the mark 'onebox drain' or 'onebox cordon' put on NODE: it takes
new and moved processes again.`
	}
	c := &cobra.Command{
		Use:   verb + " NODE",
		Short: short,
		Long:  long,
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			node := args[0]
			if err := pki.ValidNodeName(node); err != nil {
				return usagef("%v", err)
			}
			var res agent.CordonResult
			if err := agentCall(cmd, http.MethodPost, "/v1/balance/"+verb+"?"+url.Values{"node": {node}}.Encode(), 30*time.Second, nil, &res); err != nil {
				return err
			}
			if res.Cordoned {
				fmt.Fprintf(cmd.OutOrStdout(), "Node %s is cordoned: it takes no new processes ('onebox uncordon %s' ends that).\n", res.Node, res.Node)
			} else {
				fmt.Fprintf(cmd.OutOrStdout(), "Node %s is schedulable.\n", res.Node)
			}
			return nil
		},
	}
	return c
}

func newBalanceCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "balance",
		Short: "Show the load balancer's view: every node's load and its recent moves",
		Long: `balance shows, for every node, the load the balancer works with (runnable
threads of onebox processes, smoothed over a few seconds, and per CPU), whether
the node is cordoned, whether its agent balances (off with 'onebox agent
--no-balance'), and the processes it moved or tried to move lately, with why.
Nodes that cannot be asked are named, and the exit status is then 1.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cr, err := getAndPrint(cmd, "/v1/balance", func(w io.Writer, cr loadbal.ClusterReport) error {
				printBalance(w, cr)
				return nil
			})
			if err != nil {
				return err
			}
			if len(cr.Unreachable) > 0 {
				var parts []string
				for _, u := range cr.Unreachable {
					parts = append(parts, u.Node+": "+u.Error)
				}
				return fmt.Errorf("%d node(s) not listed: %s", len(cr.Unreachable), strings.Join(parts, "; "))
			}
			return nil
		},
	}
	addOutputFlag(c)
	return c
}

func printBalance(out io.Writer, cr loadbal.ClusterReport) {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tCPUS\tLOAD\tLOAD/CPU\tPROCS\tCORDONED\tBALANCING\tMIGRATING")
	yes := func(b bool) string {
		if b {
			return "yes"
		}
		return "no"
	}
	for _, r := range cr.Nodes {
		mig := r.Migrating
		if mig == "" {
			mig = "-"
		}
		fmt.Fprintf(w, "%s\t%d\t%.2f\t%.2f\t%d\t%s\t%s\t%s\n", r.Node, r.CPUs, r.Load, r.PerCPU(), len(r.Procs), yes(r.Cordoned), yes(r.Balancing), mig)
	}
	w.Flush()
	var moves []loadbal.MoveRecord
	for _, r := range cr.Nodes {
		moves = append(moves, r.Recent...)
	}
	if len(moves) == 0 {
		return
	}
	fmt.Fprintln(out)
	w = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "WHEN\tGID\tFROM\tTO\tSECONDS\tRESULT\tWHY")
	for _, m := range moves {
		result := "moved"
		if m.Error != "" {
			result = "failed: " + m.Error
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%.2f\t%s\t%s\n", m.At.Local().Format("15:04:05"), m.GID, m.From, m.To, m.Seconds, result, m.Reason)
	}
	w.Flush()
}

func balCommand(argv []string) string {
	s := strings.Join(argv, " ")
	if len(s) > 50 {
		s = s[:47] + "..."
	}
	return s
}
