package cli

import (
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/identity"
	"github.com/onebox-project/onebox/internal/version"
)

func newInitCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "init",
		Short: "Create a new cluster on this machine and print the join command",
		Long: `init creates a new cluster: a cluster CA, a gossip encryption key, a join token
and this node's certificate, stored in the data directory (files mode 0600).
It prints the command that starts this node's agent and the one that joins
other machines.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, err := outputFormat(cmd)
			if err != nil {
				return err
			}
			dataDir, _ := cmd.Flags().GetString("data-dir")
			if dataDir == "" {
				dataDir = agent.DefaultDataDir
			}
			name, _ := cmd.Flags().GetString("name")
			adv, _ := cmd.Flags().GetString("advertise")
			port, _ := cmd.Flags().GetInt("fabric-port")
			if port < 1 || port > 65535 {
				return usagef("--fabric-port %d: init needs the real port the agent will listen on (1-65535)", port)
			}
			cfg := agent.Config{NodeName: name, DataDir: dataDir, AdvertiseAddr: adv, FabricPort: port}
			if err := cfg.Validate(); err != nil {
				return usageError{err}
			}
			id, err := identity.Init(cfg.DataDir, cfg.NodeName, []net.IP{net.ParseIP(cfg.AdvertiseAddr)})
			if err != nil {
				return err
			}
			joinAddr := net.JoinHostPort(cfg.AdvertiseAddr, strconv.Itoa(cfg.FabricPort))
			startCmd := fmt.Sprintf("onebox agent --data-dir %s", cfg.DataDir)
			// The token goes in the environment, not argv: a command line is
			// readable by every local user in /proc/PID/cmdline.
			joinCmd := fmt.Sprintf("ONEBOX_TOKEN=%s onebox agent --name NODE --join %s", id.Token, joinAddr)
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), map[string]string{
					"cluster_id": id.ClusterID, "node": id.Node, "data_dir": cfg.DataDir,
					"token": id.Token.String(), "join_addr": joinAddr, "start_command": startCmd, "join_command": joinCmd,
				})
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "Created cluster %s in %s (this node: %q).\n\n", id.ClusterID, cfg.DataDir, id.Node)
			fmt.Fprintf(w, "Start this node's agent:\n  %s\n\n", startCmd)
			fmt.Fprintf(w, "Join another machine (keep the token secret; it admits nodes):\n  %s\n", joinCmd)
			return nil
		},
	}
	c.Flags().String("name", "", "this node's name (default: the host name)")
	c.Flags().String("advertise", "", "IP address other nodes reach this one at (default: first non-loopback IPv4)")
	c.Flags().Int("fabric-port", agent.DefaultFabricPort, "fabric port the agent will listen on (for the printed join command)")
	addOutputFlag(c)
	return c
}

func newAgentCmd() *cobra.Command {
	var (
		cfgFile, logLevel, logFormat, tokenFile string
		exports                                 []string
		cfg                                     agent.Config
		// capabilityFlags copy the capability flags the user set (each
		// capability registers its own, in its cmd_*.go file).
		capabilityFlags []func(*agent.Config)
	)
	c := &cobra.Command{
		Use:   "agent",
		Short: "Run the node agent (daemon)",
		Long: `agent runs this machine's onebox agent. On its first start on a new machine it
joins the cluster with --token (and --join ADDR, or LAN discovery); afterwards
the data directory holds its identity and it rejoins by itself.

SIGINT or SIGTERM make it leave the cluster gracefully.`,
		RunE: func(cmd *cobra.Command, _ []string) error {
			final := agent.Config{}
			if cfgFile != "" {
				fc, err := agent.LoadConfigFile(cfgFile)
				if err != nil {
					return usageError{err}
				}
				final = fc
			}
			f := cmd.Flags()
			set := func(name string, apply func()) {
				if f.Changed(name) {
					apply()
				}
			}
			dataDir, _ := f.GetString("data-dir")
			set("data-dir", func() { final.DataDir = dataDir })
			set("name", func() { final.NodeName = cfg.NodeName })
			set("bind", func() { final.BindAddr = cfg.BindAddr })
			set("advertise", func() { final.AdvertiseAddr = cfg.AdvertiseAddr })
			set("gossip-port", func() { final.GossipPort = cfg.GossipPort })
			set("fabric-port", func() { final.FabricPort = cfg.FabricPort })
			set("api-socket", func() { final.APISocket = cfg.APISocket })
			set("metrics-addr", func() { final.MetricsAddr = cfg.MetricsAddr })
			set("join", func() { final.Join = cfg.Join })
			set("token", func() { final.Token = cfg.Token })
			set("no-discover", func() { final.NoDiscover = cfg.NoDiscover })
			set("donate-memory", func() { final.DonateMemory = cfg.DonateMemory })
			set("reconnect-interval", func() { final.ReconnectInterval = cfg.ReconnectInterval })
			set("peer-timeout", func() { final.PeerTimeout = cfg.PeerTimeout })
			set("mount", func() { final.Mount = cfg.Mount })
			if noMount, _ := f.GetBool("no-mount"); noMount {
				final.Mount = "none"
			}
			if final.Mount == "" {
				final.Mount, final.MountOptional = agent.DefaultMount, true
			}
			for _, apply := range capabilityFlags {
				apply(&final)
			}
			if final.Token == "" && tokenFile != "" {
				b, err := os.ReadFile(tokenFile)
				if err != nil {
					return usagef("--token-file: %v", err)
				}
				final.Token = strings.TrimSpace(string(b))
			}
			if final.Token == "" {
				final.Token = os.Getenv("ONEBOX_TOKEN")
			}
			if f.Changed("token") {
				fmt.Fprintln(cmd.ErrOrStderr(), "onebox: warning: --token is visible to every local user in the process list; prefer $ONEBOX_TOKEN or --token-file")
			}
			for _, e := range exports {
				ex, err := parseExport(e)
				if err != nil {
					return usageError{err}
				}
				final.Exports = append(final.Exports, ex)
			}
			logger, err := newLogger(cmd.ErrOrStderr(), logLevel, logFormat)
			if err != nil {
				return usageError{err}
			}
			final.Logger = logger
			final.Version = version.Version
			// Validate a copy: New validates again, and defaults (such as the
			// node name from the host name) must be filled in only once.
			check := final
			if err := check.Validate(); err != nil {
				return usageError{err}
			}
			a, err := agent.New(cmd.Context(), final)
			if err != nil {
				return err
			}
			defer a.Close()
			return a.Run(cmd.Context())
		},
	}
	f := c.Flags()
	capabilityFlags = []func(*agent.Config){
		memAgentFlags(f, &cfg), serviceAgentFlags(f, &cfg), balanceAgentFlags(f, &cfg),
	}
	f.StringVar(&cfgFile, "config", "", "JSON config file (keys as in docs/ARCHITECTURE.md); flags override it")
	f.StringVar(&cfg.NodeName, "name", "", "node name (default: the host name)")
	f.StringVar(&cfg.BindAddr, "bind", "", "IP address to listen on (default 0.0.0.0)")
	f.StringVar(&cfg.AdvertiseAddr, "advertise", "", "IP address other nodes reach this one at")
	f.IntVar(&cfg.GossipPort, "gossip-port", agent.DefaultGossipPort, "gossip port (TCP+UDP); -1 picks a free one")
	f.IntVar(&cfg.FabricPort, "fabric-port", agent.DefaultFabricPort, "fabric port (TLS: join and control); -1 picks a free one")
	f.StringVar(&cfg.APISocket, "api-socket", "", "local API socket (default DATA_DIR/agent.sock)")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", "", "also serve Prometheus /metrics over plain HTTP here, e.g. 127.0.0.1:9105")
	f.StringSliceVar(&cfg.Join, "join", nil, "fabric address of a member to join (repeatable)")
	f.StringVar(&cfg.Token, "token", "", "join token (or $ONEBOX_TOKEN, or --token-file); needed only on a node's first start")
	f.StringVar(&tokenFile, "token-file", "", "read the join token from this file")
	f.BoolVar(&cfg.NoDiscover, "no-discover", false, "do not announce or look for the cluster on the LAN (mDNS)")
	f.Var(&cfg.DonateMemory, "donate-memory", "memory this node donates to the cluster pool, e.g. 2GiB")
	f.StringArrayVar(&exports, "export", nil, "export a directory to the cluster: NAME=PATH[:OPTIONS], options ro and root-squash, comma-separated (repeatable)")
	f.StringVar(&cfg.Mount, "mount", "", "mount the cluster filesystem here (PATH/NODE/EXPORT/...; needs root and /dev/fuse), or none (default "+agent.DefaultMount+" if it is free)")
	f.Bool("no-mount", false, "do not mount the cluster filesystem (same as --mount none)")
	f.DurationVar(&cfg.ReconnectInterval, "reconnect-interval", 5*time.Second, "how often to retry failed members")
	f.DurationVar(&cfg.PeerTimeout, "peer-timeout", 2*time.Second, "bound on each request to another member")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&logFormat, "log-format", "text", "text or json")
	return c
}

// parseExport reads NAME=PATH[:OPTIONS]. OPTIONS is a comma-separated
// list of ro, rw and root-squash; a last ":..." part that is not such a
// list belongs to the path.
func parseExport(s string) (api.Export, error) {
	name, path, ok := strings.Cut(s, "=")
	if !ok || name == "" || path == "" {
		return api.Export{}, fmt.Errorf("--export %q: want NAME=PATH[:OPTIONS] (options: ro, root-squash)", s)
	}
	e := api.Export{Name: name, Path: path}
	i := strings.LastIndexByte(path, ':')
	if i < 0 {
		return e, nil
	}
	var opts api.Export
	for _, o := range strings.Split(path[i+1:], ",") {
		switch o {
		case "ro":
			opts.ReadOnly = true
		case "rw":
		case "root-squash":
			opts.RootSquash = true
		default:
			return e, nil // not options: part of the path
		}
	}
	if i == 0 {
		return api.Export{}, fmt.Errorf("--export %q: no path before the options", s)
	}
	e.Path, e.ReadOnly, e.RootSquash = path[:i], opts.ReadOnly, opts.RootSquash
	return e, nil
}

func newLogger(w interface{ Write([]byte) (int, error) }, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: use debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: use text or json", format)
}

func newNodesCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "nodes [NAME...]",
		Short: "List the machines of the cluster (or the named ones)",
		Args:  cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, names []string) error {
			format, cl, err := readCommand(cmd)
			if err != nil {
				return err
			}
			nr, err := cl.Nodes(cmd.Context())
			if err != nil {
				return err
			}
			if nr, err = selectNodes(nr, names); err != nil {
				return err
			}
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), nr)
			}
			printNodes(cmd.OutOrStdout(), nr)
			return nil
		},
	}
	addOutputFlag(c)
	return c
}

// selectNodes keeps the named nodes (all when names is empty) and
// recomputes the totals over them; an unknown name is an error that lists
// the known ones.
func selectNodes(nr api.NodesResponse, names []string) (api.NodesResponse, error) {
	if len(names) == 0 {
		return nr, nil
	}
	byName := map[string]api.Node{}
	var known []string
	for _, n := range nr.Nodes {
		byName[n.Name] = n
		known = append(known, n.Name)
	}
	var out []api.Node
	seen := map[string]bool{}
	for _, name := range names {
		n, ok := byName[name]
		if !ok {
			return nr, fmt.Errorf("no node named %q in cluster %s (known: %s)", name, nr.ClusterID, strings.Join(known, ", "))
		}
		if !seen[name] {
			seen[name] = true
			out = append(out, n)
		}
	}
	nr.Nodes, nr.Totals = out, api.Sum(out)
	return nr, nil
}

func printNodes(out interface{ Write([]byte) (int, error) }, nr api.NodesResponse) {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tADDRESS\tSTATUS\tCPUS\tMEM TOTAL\tMEM FREE\tPOOL DONATED\tPOOL USED\tLOAD\tUPTIME\tAGE\tVERSION")
	for _, n := range nr.Nodes {
		status := string(n.Status)
		if n.Cordoned {
			status += ",cordoned" // kubectl's Ready,SchedulingDisabled
		}
		if n.Stale {
			status += " (stale " + n.InfoAge + ")"
		}
		if n.Info == nil {
			fmt.Fprintf(w, "%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t-\t-\t%s\n", n.Name, n.FabricAddr, status, n.Version)
			continue
		}
		r := n.Info.Resources
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%.2f\t%s\t%s\t%s\n", n.Name, n.FabricAddr, status, r.CPUs,
			size(r.MemTotalBytes), size(r.MemFreeBytes), size(n.Info.Pool.DonatedBytes), size(n.Info.Pool.UsedBytes),
			r.Load1, human(time.Since(r.BootTime)), human(time.Since(n.Info.Started)), n.Info.Version)
	}
	t := nr.Totals
	fmt.Fprintf(w, "TOTAL (%d nodes)\t\t\t%d\t%s\t%s\t%s\t%s\t%.2f\t\t\t\n", t.Nodes, t.CPUs, size(t.MemTotalBytes),
		size(t.MemFreeBytes), size(t.PoolDonated), size(t.PoolUsed), t.Load1)
	w.Flush()
}

func human(d time.Duration) string {
	switch {
	case d < 0:
		return "-"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh%dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func newStatusCmd() *cobra.Command {
	c := &cobra.Command{
		Use:   "status",
		Short: "Show the cluster as one machine",
		RunE: func(cmd *cobra.Command, _ []string) error {
			format, cl, err := readCommand(cmd)
			if err != nil {
				return err
			}
			s, err := cl.Status(cmd.Context())
			if err != nil {
				return err
			}
			if format == "json" {
				return writeJSON(cmd.OutOrStdout(), s)
			}
			printStatus(cmd.OutOrStdout(), s)
			return nil
		},
	}
	addOutputFlag(c)
	return c
}

func printStatus(out interface{ Write([]byte) (int, error) }, s api.Status) {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(w, "Cluster:\t%s (as seen by %s)\n", s.ClusterID, s.Observer)
	var parts []string
	for _, st := range []string{"alive", "suspect", "failed", "leaving", "left"} {
		if n := s.Members[st]; n > 0 || st == "alive" || st == "failed" {
			parts = append(parts, fmt.Sprintf("%d %s", n, st))
		}
	}
	fmt.Fprintf(w, "Nodes:\t%s\n", strings.Join(parts, ", "))
	fmt.Fprintf(w, "CPUs:\t%d (load %.2f, %d processes)\n", s.CPUs, s.Load1, s.Procs)
	fmt.Fprintf(w, "Memory:\t%s total, %s free\n", size(s.MemTotalBytes), size(s.MemFreeBytes))
	fmt.Fprintf(w, "Memory pool:\t%s donated, %s used\n", size(s.PoolDonated), size(s.PoolUsed))
	fmt.Fprintf(w, "Disks:\t%d, %s total, %s free\n", s.Disks, size(s.DiskTotalBytes), size(s.DiskFreeBytes))
	fmt.Fprintf(w, "NICs:\t%d\n", s.NICs)
	w.Flush()
	if len(s.DiskList) > 0 {
		fmt.Fprintln(out)
		w = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "NODE\tDISK\tMOUNT\tFS\tSIZE\tFREE")
		for _, d := range s.DiskList {
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\n", d.Node, d.Device, d.Mountpoint, d.FSType, size(d.TotalBytes), size(d.FreeBytes))
		}
		w.Flush()
	}
	if len(s.NICList) > 0 {
		fmt.Fprintln(out)
		w = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "NODE\tNIC\tSTATE\tSPEED\tADDRESSES")
		for _, n := range s.NICList {
			state := "down"
			if n.Up {
				state = "up"
			}
			speed := "-"
			if n.SpeedMbps > 0 {
				speed = fmt.Sprintf("%dMb/s", n.SpeedMbps)
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", n.Node, n.Name, state, speed, strings.Join(n.Addrs, " "))
		}
		w.Flush()
	}
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the onebox version",
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(cmd.OutOrStdout(), "onebox %s\n", version.Version)
			return nil
		},
	}
}
