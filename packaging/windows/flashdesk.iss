; Inno Setup 6 script: FlashDesk's Windows installer, built by .github/workflows/release.yml as
;   iscc /DAppVersion=0.1.0 /DAppSource=C:\...\dist\flashdesk /DOutputDir=C:\...\release packaging\windows\flashdesk.iss
; AppSource is PyInstaller's onedir (FlashDesk.exe windowed, flashdesk-cli.exe console, _internal\).
; Installs per user without administrator rights (a dialog offers all users), adds a Start menu
; entry and, if ticked, a desktop shortcut.

#ifndef AppVersion
  #define AppVersion "0.0.0"
#endif
#ifndef AppSource
  #define AppSource "..\..\dist\flashdesk"
#endif
#ifndef OutputDir
  #define OutputDir "..\..\dist"
#endif

[Setup]
AppId={{8C3E2B4A-6F1D-4E0B-9A7C-3D5F2E1B0A96}
AppName=FlashDesk
AppVersion={#AppVersion}
AppVerName=FlashDesk {#AppVersion}
AppPublisher=FlashDesk developers
DefaultDirName={autopf}\FlashDesk
DefaultGroupName=FlashDesk
DisableProgramGroupPage=yes
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
LicenseFile=..\..\LICENSE
OutputDir={#OutputDir}
OutputBaseFilename=FlashDesk-{#AppVersion}-windows-x64-setup
SetupIconFile=flashdesk.ico
UninstallDisplayIcon={app}\FlashDesk.exe
Compression=lzma2/max
SolidCompression=yes
WizardStyle=modern

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked

[Files]
Source: "{#AppSource}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{autoprograms}\FlashDesk"; Filename: "{app}\FlashDesk.exe"
Name: "{autodesktop}\FlashDesk"; Filename: "{app}\FlashDesk.exe"; Tasks: desktopicon

[Run]
Filename: "{app}\FlashDesk.exe"; Description: "{cm:LaunchProgram,FlashDesk}"; Flags: nowait postinstall skipifsilent
