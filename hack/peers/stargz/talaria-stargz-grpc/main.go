// talaria-stargz-grpc: the stargz snapshotter as a containerd proxy snapshotter (gRPC on a unix
// socket), built on github.com/containerd/stargz-snapshotter/service, for Talaria's head-to-head
// startup benchmark (issue 25). It reads the same config.toml as upstream's containerd-stargz-grpc
// (docs/overview.md) and has its defaults: socket, root, memory metadata store, docker-config
// keychain. Not supported here (they live in the unpublished cmd module): the FUSE manager, the
// db metadata store, IPFS, the CRI keychain.
//
// Extra flags for the benchmark: -insecure-registry HOST (plain HTTP to HOST, as a
// [[resolver.host."HOST".mirrors]] entry with insecure = true) and -passthrough (FUSE passthrough,
// [fuse] passthrough = true: the setting stargz's docs/passthrough.md gives for speed, kernel
// >= 6.9).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/fs"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/keychain/keychainconfig"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	metrics "github.com/docker/go-metrics"
	// go-toml v1, as upstream: it applies the config structs' `default:"..."` tags
	// ([directory_cache] direct = true, the passthrough merge buffer and workers).
	"github.com/pelletier/go-toml"
	"google.golang.org/grpc"
)

// Set by hack/tools.sh (-X main.stargzVersion=...).
var stargzVersion = "unknown"

const (
	defaultAddress    = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
	defaultConfigPath = "/etc/containerd-stargz-grpc/config.toml"
	defaultRootDir    = "/var/lib/containerd-stargz-grpc"
)

// snapshotterConfig is service.Config plus the daemon-level keys of the upstream config file
// that this daemon understands.
type snapshotterConfig struct {
	service.Config
	MetricsAddress string `toml:"metrics_address" json:"metrics_address"`
	DebugAddress   string `toml:"debug_address" json:"debug_address"`
	MetadataStore  string `toml:"metadata_store" json:"metadata_store"`
	IPFS           bool   `toml:"ipfs" json:"ipfs"`
	FuseManager    struct {
		Enable bool `toml:"enable" json:"enable"`
	} `toml:"fuse_manager" json:"fuse_manager"`
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var insecure listFlag
	address := flag.String("address", defaultAddress, "address (unix socket) of the snapshotter's gRPC server")
	configPath := flag.String("config", defaultConfigPath, "path to the configuration file (containerd-stargz-grpc's format; a missing default file means defaults)")
	rootDir := flag.String("root", defaultRootDir, "root directory of the snapshotter")
	logLevel := flag.String("log-level", "info", "log level [trace, debug, info, warn, error, fatal, panic]")
	flag.Var(&insecure, "insecure-registry", "host[:port] reached over plain HTTP (repeatable)")
	passthrough := flag.Bool("passthrough", false, "FUSE passthrough ([fuse] passthrough = true; needs kernel >= 6.9)")
	printConfig := flag.Bool("print-config", false, "print the effective configuration as JSON and exit")
	printVersion := flag.Bool("version", false, "print the version and exit")
	flag.Parse()

	if *printVersion {
		fmt.Println("talaria-stargz-grpc (stargz-snapshotter", stargzVersion+")")
		return
	}
	if err := log.SetFormat(log.JSONFormat); err != nil {
		fatal(err)
	}
	if err := log.SetLevel(*logLevel); err != nil {
		fatal(err)
	}
	ctx := log.WithLogger(context.Background(), log.L)

	cfg, err := loadConfig(*configPath, *configPath == defaultConfigPath)
	if err != nil {
		fatal(err)
	}
	for _, h := range insecure {
		if cfg.ResolverConfig.Host == nil {
			cfg.ResolverConfig.Host = map[string]resolver.HostConfig{}
		}
		hc := cfg.ResolverConfig.Host[h]
		hc.Mirrors = append(hc.Mirrors, resolver.MirrorConfig{Host: h, Insecure: true})
		cfg.ResolverConfig.Host[h] = hc
	}
	if *passthrough {
		cfg.Config.Config.FuseConfig.PassThrough = true
	}
	// As upstream: passthrough needs the directory cache to hand out files, not buffers.
	if cfg.Config.Config.FuseConfig.PassThrough {
		cfg.Config.Config.DirectoryCacheConfig.Direct = true
	}
	switch {
	case cfg.MetadataStore != "" && cfg.MetadataStore != "memory":
		fatal(fmt.Errorf("metadata_store %q: only \"memory\" (the default) is supported", cfg.MetadataStore))
	case cfg.IPFS:
		fatal(errors.New("ipfs is not supported"))
	case cfg.FuseManager.Enable:
		fatal(errors.New("fuse_manager is not supported"))
	case cfg.CRIKeychainConfig.EnableKeychain:
		fatal(errors.New("cri_keychain is not supported"))
	}
	if *printConfig {
		out, _ := json.MarshalIndent(cfg, "", "  ")
		fmt.Println(string(out))
		return
	}

	if err := service.Supported(*rootDir); err != nil {
		fatal(fmt.Errorf("snapshotter is not supported: %w", err))
	}
	rpc := grpc.NewServer()
	creds, _, err := keychainconfig.ConfigKeychain(ctx, rpc, &keychainconfig.Config{
		EnableKubeKeychain: cfg.KubeconfigKeychainConfig.EnableKeychain,
		KubeconfigPath:     cfg.KubeconfigKeychainConfig.KubeconfigPath,
	})
	if err != nil {
		fatal(fmt.Errorf("keychain: %w", err))
	}
	fsOpts := []fs.Option{
		fs.WithMetricsLogLevel(log.InfoLevel),
		fs.WithMetadataStore(memorymetadata.NewReader),
	}
	rs, err := service.NewStargzSnapshotterService(ctx, *rootDir, &cfg.Config,
		service.WithCredsFuncs(creds...), service.WithFilesystemOptions(fsOpts...))
	if err != nil {
		fatal(fmt.Errorf("snapshotter: %w", err))
	}
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))

	errCh := make(chan error, 2)
	if cfg.MetricsAddress != "" && !cfg.Config.Config.NoPrometheus {
		l, err := net.Listen("tcp", cfg.MetricsAddress)
		if err != nil {
			fatal(fmt.Errorf("metrics listener: %w", err))
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", metrics.Handler())
		go func() { errCh <- http.Serve(l, mux) }()
	}
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		fatal(err)
	}
	if err := os.RemoveAll(*address); err != nil {
		fatal(err)
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		fatal(fmt.Errorf("listen %s: %w", *address, err))
	}
	go func() { errCh <- rpc.Serve(l) }()
	log.G(ctx).WithField("address", *address).WithField("root", *rootDir).Info("serving")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sig:
		log.G(ctx).Infof("got %v", s)
	case err := <-errCh:
		log.G(ctx).WithError(err).Error("server stopped")
	}
	// The FUSE servers are goroutines of this process: unmount and clean up before exiting.
	rpc.Stop()
	if err := rs.Close(); err != nil {
		log.G(ctx).WithError(err).Warn("close snapshotter")
	}
}

func loadConfig(path string, optional bool) (snapshotterConfig, error) {
	var cfg snapshotterConfig
	data, err := os.ReadFile(path)
	if err != nil && !(optional && errors.Is(err, os.ErrNotExist)) {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	// An empty document too, for the defaults.
	if err := toml.Unmarshal(data, &cfg); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "talaria-stargz-grpc:", err)
	os.Exit(1)
}
