package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/fabric/membership"
	"github.com/onebox-project/onebox/testbed"
	"github.com/onebox-project/onebox/testbed/netns"
)

func newDevCmd() *cobra.Command {
	var opts testbed.Options
	c := &cobra.Command{
		Use:   "dev",
		Short: "Run a local cluster of real agents on this machine until interrupted",
		Long: `dev starts N real agent processes on this machine, each with its own data
directory, donating memory to the pool and exporting a scratch directory. By
default they listen on loopback ports; with --netns (root) each runs in its own
network namespace with its own address on a private bridge.

When every node is up it prints one line ONEBOX_AGENT=<address>; export it (or
pass --agent) and the CLI talks to that cluster. Ctrl-C stops the agents and
removes everything dev created.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if opts.Nodes < 1 {
				return usagef("--nodes must be at least 1")
			}
			if opts.NetNS {
				if err := netns.Available(); err != nil {
					return fmt.Errorf("--netns: %w", err)
				}
				_ = netns.CleanupStale(netns.NamePrefix)
			}
			out := cmd.OutOrStdout()
			opts.Logf = func(f string, a ...any) { fmt.Fprintf(cmd.ErrOrStderr(), "dev: "+f+"\n", a...) }
			cl, err := testbed.Start(cmd.Context(), opts)
			if err != nil {
				return err
			}
			defer func() {
				opts.Logf("stopping %d agents", len(cl.Nodes))
				if err := cl.Close(); err != nil {
					opts.Logf("cleanup: %v", err)
				} else {
					opts.Logf("removed everything dev created")
				}
			}()
			for _, n := range cl.Nodes {
				where := n.Ready.FabricAddr
				opts.Logf("%s  fabric %s  gossip %s  data %s", n.Name, where, n.Ready.GossipAddr, n.DataDir)
			}
			opts.Logf("join token: %s", cl.Token)
			fmt.Fprintf(out, "ONEBOX_AGENT=%s\n", cl.Nodes[0].Agent())
			opts.Logf("cluster of %d nodes ready; try: ONEBOX_AGENT=%s onebox nodes   (Ctrl-C to stop)", len(cl.Nodes), cl.Nodes[0].Agent())
			<-cmd.Context().Done()
			return nil
		},
	}
	c.Flags().IntVar(&opts.Nodes, "nodes", 3, "number of agents")
	c.Flags().BoolVar(&opts.NetNS, "netns", false, "run each agent in its own network namespace (root)")
	c.Flags().StringVar(&opts.Dir, "dir", "", "directory for the nodes' data (default: a temporary one, removed on exit)")
	c.Flags().StringVar(&opts.DonateMemory, "donate-memory", "256MiB", "memory each agent donates to the pool")
	c.Flags().BoolVar(&opts.Discover, "discover", false, "let agents announce themselves by mDNS (useful with --netns)")
	return c
}

func newDemoCmd() *cobra.Command {
	var nodes int
	var netnsMode bool
	c := &cobra.Command{
		Use:   "demo",
		Short: "Show what onebox does on a local cluster, then clean up",
		RunE: func(cmd *cobra.Command, _ []string) error {
			if nodes < 2 {
				return usagef("--nodes must be at least 2")
			}
			return runDemo(cmd.Context(), cmd.OutOrStdout(), nodes, netnsMode)
		},
	}
	c.Flags().IntVar(&nodes, "nodes", 4, "number of agents (4 let the memory step keep 2 copies of a program larger than one donation on the nodes other than its own)")
	c.Flags().BoolVar(&netnsMode, "netns", false, "run each agent in its own network namespace (root)")
	return c
}

// demoProcess runs a program on another node through the CLI, as a user
// would, and shows that its output and exit status come back.
func demoProcess(ctx context.Context, out io.Writer, cl *testbed.Cluster) error {
	from, on := cl.Nodes[0], cl.Nodes[1]
	script := `echo "hello from $(hostname), pid $$"; seq 1 3; exit 3`
	fmt.Fprintf(out, "\n==> onebox run --node %s -- sh -c '%s'   (issued on %s)\n", on.Name, script, from.Name)
	self, err := os.Executable()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, self, "run", "--agent", from.Agent(), "--node", on.Name, "--", "sh", "-c", script)
	cmd.Stdout, cmd.Stderr = out, out
	err = cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee) && ee.ExitCode() == 3:
		fmt.Fprintf(out, "    the program ran on %s; its output streamed back and 'onebox run' exited with its status, 3\n", on.Name)
	case err == nil:
		return fmt.Errorf("demo: 'onebox run' exited 0, want the program's status 3")
	default:
		return fmt.Errorf("demo: onebox run: %w", err)
	}
	return nil
}

// demoFiles writes a file into the last node's export through the first
// node's mount of the cluster filesystem and reads it back from the last
// node's own disk. It is skipped (with the reason) where FUSE is not there.
func demoFiles(out io.Writer, cl *testbed.Cluster) {
	from, to := cl.Nodes[0], cl.Nodes[len(cl.Nodes)-1]
	mnt := filepath.Join(from.DataDir, "mnt")
	path := filepath.Join(mnt, to.Name, "scratch", "hello.txt")
	fmt.Fprintf(out, "\n==> Files: %s writes %s (%s's export, through %s's mount of the cluster filesystem)\n", from.Name, path, to.Name, from.Name)
	if _, err := os.Stat(filepath.Join(mnt, to.Name)); err != nil {
		fmt.Fprintf(out, "    skipped: no cluster filesystem mount here (needs root and /dev/fuse)\n")
		return
	}
	msg := fmt.Sprintf("written on %s at %s\n", from.Name, time.Now().Format(time.RFC3339))
	if err := os.WriteFile(path, []byte(msg), 0o644); err != nil {
		fmt.Fprintf(out, "    write failed: %v\n", err)
		return
	}
	b, err := os.ReadFile(filepath.Join(to.DataDir, "scratch", "hello.txt"))
	if err != nil {
		fmt.Fprintf(out, "    read on %s failed: %v\n", to.Name, err)
		return
	}
	fmt.Fprintf(out, "    %s's own disk now holds: %s", to.Name, b)
}

func runDemo(ctx context.Context, out io.Writer, nodes int, netnsMode bool) error {
	say := func(f string, a ...any) { fmt.Fprintf(out, f+"\n", a...) }
	step := func(f string, a ...any) { fmt.Fprintf(out, "\n==> "+f+"\n", a...) }
	step("Starting %d onebox agents on this machine (real processes; the first creates the cluster, the others join with its token over mutual TLS)", nodes)
	t0 := time.Now()
	cl, err := testbed.Start(ctx, testbed.Options{Nodes: nodes, NetNS: netnsMode, DonateMemory: "512MiB",
		Logf: func(f string, a ...any) { say("    "+f, a...) }})
	if err != nil {
		return err
	}
	defer func() {
		step("Cleaning up")
		if err := cl.Close(); err != nil {
			say("    cleanup: %v", err)
		} else {
			say("    all agents stopped, data directories removed")
		}
	}()
	formed := time.Since(t0)
	say("    %d nodes agree on membership %.1fs after start", nodes, formed.Seconds())
	client := cl.Client(cl.Nodes[0])

	step("onebox nodes  (every machine, as seen from %s)", cl.Nodes[0].Name)
	nr, err := client.Nodes(ctx)
	if err != nil {
		return err
	}
	printNodes(out, nr)

	step("onebox status  (the cluster as one machine)")
	st, err := client.Status(ctx)
	if err != nil {
		return err
	}
	printStatus(out, st)

	if err := demoProcess(ctx, out, cl); err != nil {
		return err
	}
	demoFiles(out, cl)
	if err := demoMigrate(ctx, out, cl); err != nil {
		return err
	}
	if err := demoMemory(ctx, out, cl); err != nil {
		return err
	}
	if err := demoService(ctx, out, cl); err != nil {
		return err
	}

	victim := cl.Nodes[len(cl.Nodes)-1]
	step("Killing %s's agent with SIGKILL (a crash: no goodbye)", victim.Name)
	if err := cl.Kill(victim); err != nil {
		return err
	}
	t1 := time.Now()
	if err := cl.WaitStatus(ctx, 30*time.Second, cl.Nodes[0], victim.Name, membership.StatusFailed); err != nil {
		return err
	}
	detect := time.Since(t1)
	say("    %s declared failed by %s after %.1fs", victim.Name, cl.Nodes[0].Name, detect.Seconds())
	st2, err := client.Status(ctx)
	if err != nil {
		return err
	}
	say("    the machine now counts %d CPUs and %s memory on %d live nodes (was %d CPUs)", st2.CPUs, size(st2.MemTotalBytes), st2.Nodes, st.CPUs)

	step("Restarting %s: it rejoins with the identity in its data directory", victim.Name)
	t2 := time.Now()
	if err := cl.StartNode(ctx, victim); err != nil {
		return err
	}
	if err := cl.WaitStatus(ctx, 30*time.Second, cl.Nodes[0], victim.Name, membership.StatusAlive); err != nil {
		return err
	}
	rejoin := time.Since(t2)
	say("    %s alive again after %.1fs", victim.Name, rejoin.Seconds())

	step("Summary")
	say("    cluster %s: %d nodes, %d CPUs, %s memory, %s pool donated", nr.ClusterID, nr.Totals.Nodes, nr.Totals.CPUs, size(nr.Totals.MemTotalBytes), size(nr.Totals.PoolDonated))
	say("    formed in %.1fs; crash detected in %.1fs; rejoined in %.1fs", formed.Seconds(), detect.Seconds(), rejoin.Seconds())
	say("    next: 'onebox dev --nodes 3' for a cluster that stays up")
	return nil
}
